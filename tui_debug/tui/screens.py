"""Modal screens: help (every key), quit confirmation, a finding's detail."""

from __future__ import annotations

import json

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ..errors import ErrorInfo

HELP_KEYS = [
    ("Recovery (applied by the training thread at the next step boundary)", [
        ("c", "clear cache: gc.collect() + torch.cuda.empty_cache(); memory before/after"),
        ("l", "lower the learning rate of every optimizer (x0.5), old -> new"),
        ("L", "raise the learning rate of every optimizer (x2), old -> new"),
        ("g", "toggle gradient-norm clipping (2x the recent median total norm)"),
        ("b", "roll back models and optimizers to the last good snapshot"),
        ("s", "save a checkpoint (state_dicts) into the run folder"),
        ("p", "pause / resume training at a step boundary"),
    ]),
    ("Run", [
        ("r", "write the report now and show its path"),
        ("q / ctrl+c", "quit: asks first while training runs (stops it cleanly, exit 130)"),
        ("?", "this help"),
        ("i", "the script's input line, while it reads its stdin (input(), pdb): enter sends a line, "
              "ctrl+d the end of file, esc back to the panes"),
    ]),
    ("Moving around", [
        ("tab / shift+tab", "next / previous pane"),
        ("1 2 3 4 5", "focus Errors, Gradients, Loss, GPU, Output"),
        ("arrows pgup pgdn", "move / scroll in the focused pane (home/end too)"),
        ("enter", "Errors: open the highlighted finding's detail (esc closes)"),
        ("o", "Gradients: model order / most relevant first"),
    ]),
]


def help_text() -> Text:
    t = Text()
    for i, (title, keys) in enumerate(HELP_KEYS):
        if i:
            t.append("\n")
        t.append(title + "\n", "bold underline")
        for k, desc in keys:
            t.append(f"  {k:>16}  ", "bold cyan")
            t.append(desc + "\n")
    return t


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="modal-box") as box:
            box.border_title = "tui_debug keys"
            box.border_subtitle = "esc to close"
            yield Static(help_text())


class ConfirmQuit(ModalScreen[bool]):
    BINDINGS = [Binding("y,enter", "answer(True)", "yes"), Binding("n,escape,q", "answer(False)", "no")]

    def compose(self) -> ComposeResult:
        with Vertical(id="quit-box", classes="modal-box") as box:
            box.border_title = "Quit?"
            yield Static(Text.assemble(("Training is still running.\n", "bold"),
                                       "Stop it (report written, exit 130) and quit?\n\n",
                                       ("y", "bold cyan"), " yes    ", ("n", "bold cyan"), " no"))

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def detail_text(info: ErrorInfo, actions: list[dict] | None = None) -> Text:
    t = Text()
    sev = info.severity.value
    t.append(f"{sev.upper()} ", "bold red" if sev in ("error", "critical") else "bold yellow")
    t.append(f"{info.category.value}\n", "bold")
    t.append(info.message + "\n\n")
    steps = f"step {info.step}" if info.step is not None else "before the first step"
    if info.count > 1:
        steps += f"; seen {info.count}x, steps {info.first_step}-{info.last_step}"
    t.append("When   ", "bold")
    t.append(steps + "\n")
    modules = [f"{k}: {v}" for k, v in info.context.items() if "module" in k or "param" in k or k == "layer"]
    if modules:
        t.append("Where  ", "bold")
        t.append("; ".join(str(m) for m in modules) + "\n")
    t.append("Action ", "bold")
    t.append((info.recovery_action or "none taken") + ("  (resolved)" if info.resolved else "") + "\n")
    if info.recommendation:
        t.append("Advice ", "bold")
        t.append(info.recommendation + "\n")
    if info.context:
        t.append("\nContext\n", "bold underline")
        for k, v in info.context.items():
            val = v if isinstance(v, str) else json.dumps(v, default=repr)
            t.append(f"  {k}: ", "cyan")
            t.append(f"{val}\n")
    if actions:
        t.append("\nRecovery actions in this run\n", "bold underline")
        for a in actions[-8:]:
            t.append(f"  step {a.get('step')}: {a.get('action')}: {a.get('message', '')}\n")
    if info.traceback:
        t.append("\nTraceback\n", "bold underline")
        t.append(info.traceback.rstrip() + "\n", "dim")
    return t


class FindingDetail(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,enter", "dismiss", "close")]

    def __init__(self, info: ErrorInfo, actions: list[dict] | None = None) -> None:
        super().__init__()
        self.info = info
        self.actions = actions

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail-box", classes="modal-box") as box:
            box.border_title = f"Finding: {self.info.category.value} at step {self.info.step}"
            box.border_subtitle = "esc to close"
            yield Static(detail_text(self.info, self.actions), id="detail-body")
