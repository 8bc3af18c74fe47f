"""Human names for what the instrumentation sees: losses by their expression, models by variable."""

from __future__ import annotations

import ast
import builtins
import linecache
import os
import sys
from types import CodeType, FrameType
from typing import Any

_TORCH_DIR: str | None = None
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB = os.path.dirname(os.__file__) + os.sep
_USER_FILES: set[str] = set()  # the script run: the user's code wherever it lies (an installed package's module)


def torch_dir() -> str:
    global _TORCH_DIR
    if _TORCH_DIR is None:
        torch = sys.modules.get("torch")
        _TORCH_DIR = (os.path.dirname(torch.__file__) + os.sep) if torch is not None and torch.__file__ else "\0"
    return _TORCH_DIR


def add_user_file(path: str) -> None:
    _USER_FILES.add(path)


def is_library_frame(code: CodeType) -> bool:
    """Frames of torch, tui_debug, the standard library or an installed package: skipped when
    looking for the user's call site. Under Lightning or accelerate the ``backward`` of a GAN's two
    losses was called from one line of theirs: both losses were one, named after that line, and
    the model ``lightning_module`` (the script's ``m``)."""
    fn = code.co_filename
    if fn.startswith(torch_dir()) or fn.startswith(_OWN_DIR):
        return True
    if fn in _USER_FILES:
        return False
    return (fn.startswith(_STDLIB) or fn.startswith("<frozen") or "site-packages" in fn
            or "dist-packages" in fn)


def user_frame(frame: FrameType | None) -> FrameType | None:
    while frame is not None and is_library_frame(frame.f_code):
        frame = frame.f_back
    return frame


def _instruction_source(code: CodeType, lasti: int) -> tuple[str, int] | None:
    """The source text of the expression containing instruction ``lasti`` (3.11+ positions)."""
    positions = getattr(code, "co_positions", None)
    if positions is None:
        return None
    try:
        pos = list(positions())[lasti // 2]
    except (IndexError, ValueError):
        return None
    lineno, end_lineno, col, end_col = pos
    if lineno is None or col is None or end_col is None:
        return None
    lines = [linecache.getline(code.co_filename, n) for n in range(lineno, (end_lineno or lineno) + 1)]
    if not any(lines):
        return None
    if len(lines) == 1:
        return lines[0][col:end_col], lineno
    lines[0] = lines[0][col:]
    lines[-1] = lines[-1][:end_col]
    return "".join(lines), lineno


_PARSED: dict[str, ast.AST | None] = {}
# whose ``.backward(X)`` backpropagates X (not a tensor's, whose first argument is its gradient): names
# starting so (``autograd``, ``accelerator``/``acc``/``accel``, ``fabric``, DeepSpeed's ``engine``/``model_engine``)
_BACKWARD_OWNERS = ("autograd", "acc", "fabric", "engine", "model_engine", "deepspeed")


def _line_source(filename: str, lineno: int) -> str | None:
    """Before 3.11 (no instruction positions): the backward call on line ``lineno``, when the
    innermost statement there holds exactly one."""
    if filename not in _PARSED:
        if len(_PARSED) > 64:
            _PARSED.clear()
        try:
            _PARSED[filename] = ast.parse("".join(linecache.getlines(filename)))
        except (SyntaxError, ValueError):
            _PARSED[filename] = None
    tree = _PARSED[filename]
    if tree is None:
        return None

    def on_line(n: Any) -> bool:
        return n.lineno <= lineno <= (n.end_lineno or n.lineno)

    stmts = [n for n in ast.walk(tree) if isinstance(n, ast.stmt) and on_line(n)]
    innermost = [n for n in stmts if not any(o is not n and on_line(o) for o in ast.walk(n) if isinstance(o, ast.stmt))]
    calls = [c for stmt in innermost for c in ast.walk(stmt)
             if isinstance(c, ast.Call) and on_line(c) and _backward_target(c) is not None]
    outer = [c for c in calls if not any(c is not o and c in ast.walk(o) for o in calls)]
    return ast.unparse(outer[0]) if len(outer) == 1 else None


def _backward_target(node: ast.AST) -> ast.AST | None:
    """In ``X.backward(...)`` or ``torch.autograd.backward(X)`` the X; unwraps ``scaler.scale(X)``;
    the loss handed to a library's backward: ``accelerator.backward(X)``, ``fabric.backward(X)``,
    DeepSpeed's ``engine.backward(X)``, Lightning's ``self.manual_backward(X)``."""
    target = None
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            func = sub.func
            if isinstance(func, ast.Attribute) and func.attr == "manual_backward" and sub.args:
                target = sub.args[0]
                break
            if isinstance(func, ast.Attribute) and func.attr == "backward":
                owner = func.value.id if isinstance(func.value, ast.Name) else (
                    func.value.attr if isinstance(func.value, ast.Attribute) else None)
                first = sub.args[0] if sub.args else None
                if owner is not None and first is not None and owner.lower().startswith(_BACKWARD_OWNERS):
                    # a wrapper's backward(loss) (``acc.backward(d_loss)``), not a tensor's, whose
                    # positional argument is its gradient (WGAN code's ``errD_real.backward(one)``)
                    target = first
                else:
                    target = func.value
                break
            if isinstance(func, ast.Name) and func.id == "backward" and sub.args:
                target = sub.args[0]
                break
    # scaler.scale(loss) / accelerator-style wrappers with one argument
    while (isinstance(target, ast.Call) and isinstance(target.func, ast.Attribute)
           and target.func.attr in ("scale",) and len(target.args) == 1):
        target = target.args[0]
    return target


def loss_name(frame: FrameType) -> tuple[str, str]:
    """(name, "file:line") for the loss backpropagated at ``frame``'s current instruction."""
    code = frame.f_code
    source = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}"
    found = _instruction_source(code, frame.f_lasti)
    if found is None and not hasattr(code, "co_positions"):
        line = _line_source(code.co_filename, frame.f_lineno)
        found = (line, frame.f_lineno) if line is not None else None
    text = None
    if found is not None:
        text, _ = found
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError:
            tree = None
        if tree is not None:
            target = _backward_target(tree)
            if target is not None:
                text = ast.unparse(target)
            elif isinstance(tree.body, ast.Attribute) and tree.body.attr == "backward":
                text = ast.unparse(tree.body.value)
            else:
                text = "loss"  # backward was called inside a library the script called (e.g. our API)
    if not text:
        return f"loss@{source}", source
    text = " ".join(text.split())
    if len(text) > 40:
        text = text[:37] + "..."
    return text, source


# A function frame's f_locals is, before 3.13 (PEP 667), a dict the frame keeps: reading it holds
# every local as it was until the frame reads it again or returns. Naming a k-fold run's model that
# way kept the last fold's model, optimizer and their states alive into the next fold.
_LOCALS_KEPT = sys.version_info < (3, 13)
_BUILTINS = frozenset(dir(builtins))
_CO_OPTIMIZED = 0x1


def callee_name(frame: FrameType) -> str | None:
    """The name the call at ``frame``'s current instruction calls: ``model`` in ``model(x)``, ``G`` in
    ``self.G(z)`` (3.11+ positions; read from the source, not from the frame's locals)."""
    found = _instruction_source(frame.f_code, frame.f_lasti)
    if found is None:
        return None
    try:
        tree = ast.parse(found[0].strip(), mode="eval")
    except SyntaxError:
        return None
    if not isinstance(tree.body, ast.Call):
        return None
    func = tree.body.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if name is None or name.startswith("_") or name in _BUILTINS:  # list(map(encoder, xs)): not "list"
        return None
    if name == "self":  # self(x) in a model's own method (Lightning's training_step): its caller's object
        caller = frame.f_back
        if caller is None or is_library_frame(caller.f_code):
            # called by a library (Lightning's loop): the script's line further out, ``trainer.fit(m)``,
            # names the trainer, not the model; the script's variables do (see variable_name)
            return None
        found = _instruction_source(caller.f_code, caller.f_lasti) if caller is not None else None
        try:
            call = ast.parse(found[0].strip(), mode="eval").body if found is not None else None
        except SyntaxError:
            return None
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
            owner = call.func.value  # model in model.training_step(batch), module in self.module.step()
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
            return name if name is not None and not name.startswith("_") and name != "self" else None
        return None
    return name


def variable_name(obj: Any, frame: FrameType | None, caller: FrameType | None = None,
                  max_frames: int = 6) -> str | None:
    """The name the script gives ``obj``: the callee of its call in ``caller`` (the frame that called
    the module, ``model(x)``) when that is the user's code, else a name a user frame binds it to
    (locals, then globals).

    Before 3.13 a function frame's locals are read only when the callee cannot be (3.10: no
    positions), since reading them keeps them alive (see ``_LOCALS_KEPT``)."""
    if caller is not None and not is_library_frame(caller.f_code) and hasattr(caller.f_code, "co_positions"):
        name = callee_name(caller)
        if name is not None:
            return name
    read_locals = not _LOCALS_KEPT or not hasattr(CodeType, "co_positions")
    frame = user_frame(frame)
    seen = 0
    while frame is not None and seen < max_frames:
        if not is_library_frame(frame.f_code):
            seen += 1
            function = frame.f_code.co_flags & _CO_OPTIMIZED
            for scope in ((frame.f_locals, frame.f_globals) if read_locals or not function else (frame.f_globals,)):
                for name, value in list(scope.items()):
                    if value is obj and not name.startswith("_") and name != "self":
                        return name
        frame = frame.f_back
    return None
