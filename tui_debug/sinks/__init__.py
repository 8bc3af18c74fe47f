"""Sinks consume the run's stream: the headless printer, the report writer, the terminal UI."""
