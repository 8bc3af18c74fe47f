"""Classify what the script raised into the design document's categories, with advice."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback
from typing import Any, Callable

_CPU_OOM = re.compile(r"you tried to allocate (\d+) bytes")
_CUDA_OOM = re.compile(r"Tried to allocate ([\d.]+ ?[KMGT]?i?B)")
_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process (\d+)")
_DATA_DIR = os.sep + os.path.join("torch", "utils", "data") + os.sep
_AUTOGRAD_DIR = os.sep + os.path.join("torch", "autograd") + os.sep
_FUNCTIONAL = os.sep + os.path.join("torch", "nn", "functional.py")  # a loss or layer called as a function


@dataclasses.dataclass
class Classified:
    severity: str
    category: str
    message: str
    context: dict[str, Any]
    recommendation: str


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def memory_context() -> dict[str, Any]:
    """RSS and system memory; CUDA allocator figures only if the script already initialised CUDA."""
    ctx: dict[str, Any] = {}
    try:
        import psutil

        ctx["rss_bytes"] = psutil.Process().memory_info().rss
        vm = psutil.virtual_memory()
        ctx["system_total_bytes"] = vm.total
        ctx["system_available_bytes"] = vm.available
    except Exception:
        pass
    try:
        import resource

        ctx["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except Exception:  # not on this platform
        pass
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            ctx["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            ctx["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
            ctx["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    except Exception:
        pass
    return ctx


def _last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else text.strip()


def _is_oom_type(exc: BaseException) -> bool:
    return any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


def raised_mid_step(exc: BaseException, failing_modules: list[str] | None) -> bool:
    """Whether ``exc`` came from inside a training iteration before its optimizer step (a model's
    forward, a backward, loading its batch): it then belongs to the step in progress, numbered as a
    NaN found in that forward would be, not to the last one done."""
    if failing_modules:
        return True
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    return any(_AUTOGRAD_DIR in f.filename or _DATA_DIR in f.filename or f.filename.endswith(_FUNCTIONAL)
               for f in frames) or \
        bool(_WORKER.search(safe_str(exc)))


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or Python's own stand-in when the exception's ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


# Exception classes, by name anywhere in their MRO (requests, urllib3, aiohttp, torch.distributed are
# not imported to test for theirs), that say a remote end or the network failed, or a wait ran out.
_TIMEOUT_NAMES = ("TimeoutError", "TimeoutExpired", "Timeout", "ConnectTimeout", "ReadTimeout",
                  "DistTimeoutError")
_NETWORK_NAMES = ("ConnectionError", "URLError", "HTTPError", "HTTPException", "gaierror", "herror", "SSLError",
                  "RequestException", "ProtocolError", "NewConnectionError", "MaxRetryError", "ClientError",
                  "DistNetworkError", "RemoteDisconnected")
_TIMEOUT_TEXT = re.compile(r"Watchdog caught collective operation timeout|DataLoader timed out after|"
                           r"\btimed out\b", re.IGNORECASE)


def _mro_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _is_timeout(exc: BaseException, text: str) -> bool:
    names = _mro_names(exc)
    reason = getattr(exc, "reason", None)  # urllib's URLError wraps the socket's timeout
    return bool(names & set(_TIMEOUT_NAMES)) or isinstance(reason, TimeoutError) or (
        isinstance(exc, RuntimeError) and bool(_TIMEOUT_TEXT.search(text)))


def classify_exception(exc: BaseException, failing_modules: list[str] | None = None,
                       evaluating: bool = False) -> Classified:
    """``evaluating``: raised in a forward of an evaluation pass (no_grad, or the model in eval mode)."""
    text = safe_str(exc)
    name = type(exc).__name__
    where = f" in {failing_modules[0]}" if failing_modules else ""
    ctx: dict[str, Any] = {"exception_type": name}
    if failing_modules:
        ctx["module"] = failing_modules[0]
        ctx["module_stack"] = failing_modules
    # -- memory ----------------------------------------------------------------------------
    cpu = _CPU_OOM.search(text)
    if cpu or _is_oom_type(exc) or isinstance(exc, MemoryError) or "CUDA out of memory" in text:
        ctx.update(memory_context())
        if cpu:
            size = int(cpu.group(1))
            ctx["requested_bytes"] = size
            what = f"CPU out of memory{where}: tried to allocate {human_bytes(size)}"
        else:
            cuda = _CUDA_OOM.search(text)
            if cuda:
                ctx["requested"] = cuda.group(1)
                what = f"CUDA out of memory{where}: tried to allocate {cuda.group(1)}"
            else:
                what = f"out of memory{where} ({name})"
        if "rss_bytes" in ctx:
            what += f" (process RSS {human_bytes(ctx['rss_bytes'])}"
            if "system_available_bytes" in ctx:
                what += (f", system memory {human_bytes(ctx['system_available_bytes'])} free of "
                         f"{human_bytes(ctx['system_total_bytes'])}")
            what += ")"
        return Classified("error", "memory_error", what, ctx,
                          "Reduce the batch size or sequence length, free tensors kept across steps "
                          "(store loss.item(), not loss), use mixed precision or gradient checkpointing; "
                          "an allocation far beyond the device usually means a wrong shape.")
    # -- data ------------------------------------------------------------------------------
    worker = _WORKER.search(text)
    if worker:
        original = text.split("Original Traceback (most recent call last):", 1)
        ctx["worker"] = int(worker.group(2))
        ctx["original_exception"] = worker.group(1)
        if len(original) == 2:
            ctx["original_traceback"] = "Traceback (most recent call last):" + original[1]
        last = _last_line(text)
        if last.startswith(worker.group(1) + ":"):
            last = last[len(worker.group(1)) + 1:].strip()
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text)
        where_in = ""
        if frames:
            f, line, fn = frames[-1]
            ctx["dataset_frame"] = f"{os.path.basename(f)}:{line} in {fn}"
            where_in = f" (at {ctx['dataset_frame']})"
        return Classified("error", "data_error",
                          f"{worker.group(1)} in DataLoader worker {worker.group(2)}: {last}{where_in}", ctx,
                          "The dataset (or its transform/collate_fn) raised for one sample: the original "
                          "traceback in this finding points at the line; run with num_workers=0 to debug it "
                          "in-process.")
    if "DataLoader worker" in text and ("exited unexpectedly" in text or "killed" in text):
        return Classified("error", "data_error", f"a DataLoader worker died: {_last_line(text)}", ctx,
                          "A worker was killed (often by the out-of-memory killer or a segfault in a "
                          "transform): lower num_workers or the batch size, check `dmesg`.")
    if re.search(r"Target -?\d+ is out of bounds", text) or "device-side assert" in text:
        return Classified("error", "data_error", f"labels out of range for the loss{where}: {_last_line(text)}", ctx,
                          "A class index is >= the number of classes (or negative): check the label encoding "
                          "and the size of the model's output layer.")
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if any(_DATA_DIR in f.filename for f in frames):
        user = [f for f in frames if _DATA_DIR not in f.filename and os.sep + "torch" + os.sep not in f.filename]
        if user:
            ctx["dataset_frame"] = f"{os.path.basename(user[-1].filename)}:{user[-1].lineno}"
        return Classified("error", "data_error", f"{name} while loading data: {_last_line(text) or name}", ctx,
                          "The dataset, sampler or collate_fn raised while building a batch; the "
                          "traceback points at the line.")
    what = f"{name}{where}: {_last_line(text)}" if text else f"{name}{where}"
    # -- waits and the network (a dataset that downloads is a data_error above) -------------------
    if _is_timeout(exc, text):
        return Classified("error", "timeout_error", what, ctx,
                          "An operation waited longer than its timeout: a remote end, a collective whose "
                          "other ranks did not arrive (one crashed or is slower), or a stuck DataLoader "
                          "worker. The traceback shows which wait; raise its timeout only once it is known "
                          "to be merely slow.")
    if _mro_names(exc) & set(_NETWORK_NAMES):
        return Classified("error", "network_error", what, ctx,
                          "A network operation failed (the host, the connection, or the remote end's "
                          "answer): check the address and the connection; a download at start-up is best "
                          "cached to disk, a checkpoint upload retried.")
    advice = advise(text, failing_modules[0] if failing_modules else None)
    if evaluating:
        return Classified("error", "evaluation_error", f"{what} (in an evaluation pass)", ctx,
                          ("Compare the evaluation batch with a training one first (the same model trained on "
                           "those): " + advice) if advice else
                          "The evaluation code raised (a forward under torch.no_grad() or in eval mode); the "
                          "traceback shows where.")
    return Classified("error", "training_error", what,
                      ctx, advice or "The script raised; the traceback shows where (and the module it happened "
                                     "in, when it was in a forward).")


def _torch_version() -> str:
    torch = sys.modules.get("torch")
    return str(getattr(torch, "__version__", "?"))


# PyTorch's common training errors, told by their message (torch 2.x wording), with what to change.
# ``who`` is the module the error happened in when a forward was running ("model.2 (Linear)"), else None.
_ADVICE: list[tuple[re.Pattern[str], Callable[[re.Match[str], str | None], str]]] = [
    (re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)"),
     lambda m, who: (f"{who} takes {m[3]} input features but was given {m[2]}: make its in_features {m[2]} "
                     "(nn.LazyLinear infers it), or fix what feeds it (a Flatten's size changes with the image "
                     "size)." if who and "Linear)" in who else
                     f"A matrix product{f' in {who}' if who else ''} multiplied ({m[1]}x{m[2]}) by ({m[3]}x{m[4]}): "
                     f"the inner sizes ({m[2]}, {m[3]}) must match; a Linear's in_features is the second.")),
    (re.compile(r"weight of size \[(\d+), (\d+)[^\]]*\], expected input\[[^\]]*\] to have (\d+) channels, "
                r"but got (\d+) channels"),
     lambda m, who: f"{who or 'The layer'} takes {m[3]} input channels but was given {m[4]}: make its in_channels {m[4]}, or "
                    "check the data's layout (channels first, N, C, H, W: images loaded as N, H, W, C need "
                    ".permute(0, 3, 1, 2))."),
    (re.compile(r"must have the same dtype, but got (\w+) and (\w+)|to have the same dtype, but got: (\w+) != (\w+)"
                r"|expected scalar type (\w+) but found (\w+)"),
     lambda m, who: _dtype_advice([g for g in m.groups() if g], who)),
    (re.compile(r"expected target dtype to be Long"),
     lambda m, who: "cross_entropy takes class indices as int64 (labels.long()), or class probabilities of "
                    "the same shape as its input."),
    (re.compile(r"element 0 of tensors does not require grad and does not have a grad_fn"),
     lambda m, who: "The loss is not connected to any trainable parameter: it was computed under "
                    "torch.no_grad() or inference_mode(), from values taken out of the graph (.detach(), "
                    ".item(), .numpy(), .data), or every parameter has requires_grad=False."),
    (re.compile(r"Trying to backward through the graph a second time"),
     lambda m, who: "A tensor from an earlier iteration's graph is used again: detach what is carried from "
                    "step to step (an RNN's hidden state: h = h.detach(); a running total: total += "
                    "loss.item()). retain_graph=True only when two backward passes over one graph are meant."),
    (re.compile(r"modified by an inplace operation: \[(.+?)\], which is output (\d+) of (\w+)"),
     lambda m, who: f"An in-place operation changed the output of {m[3]} after autograd saved it for the "
                    "backward: use the out-of-place form (x = x + y, not x += y; ReLU(inplace=False); no "
                    "x[i] = ... on it). torch.autograd.set_detect_anomaly(True) names the forward line."),
    (re.compile(r"index out of range in self"),
     lambda m, who: f"{who or 'An embedding (or index_select)'} was given an index beyond "
                    "its size (or a negative one): compare the largest id in the batch with the num_embeddings "
                    "it was made with (padding and special tokens included)."),
    (re.compile(r"Expected input batch_size \((\d+)\) to match target batch_size \((\d+)\)"),
     lambda m, who: f"The model's output has {m[1]} rows and the labels {m[2]}: a view or reshape merged or "
                    "split the batch dimension, or a sequence model's output needs flattening as its labels "
                    "are (logits.view(-1, n_classes), labels.view(-1))."),
    (re.compile(r"grad can be implicitly created only for scalar outputs"),
     lambda m, who: "backward() was called on a tensor of several elements: reduce it to one loss first "
                    "(.mean() or .sum()), or pass gradient= of its shape."),
    (re.compile(r"Torch not compiled with CUDA enabled"),
     lambda m, who: f"This PyTorch build has no CUDA (torch {_torch_version()}): install a CUDA build, or let "
                    "the script choose: device = 'cuda' if torch.cuda.is_available() else 'cpu'."),
    (re.compile(r"Expected all tensors to be on the same device"),
     lambda m, who: "Tensors on two devices met" + (f" in {who}" if who else "") + ": move the "
                    "model (model.to(device)) and every tensor of the batch (x.to(device)) to one device; "
                    "tensors made inside forward need device=x.device."),
    (re.compile(r"Expected more than 1 value per channel when training"),
     lambda m, who: f"{who or 'A BatchNorm'} in training mode was given a batch of one "
                    "sample: DataLoader(drop_last=True) drops a last batch of one; use eval() to run single "
                    "samples."),
    (re.compile(r"input.size\(-1\) must be equal to input_size. Expected (\d+), got (\d+)"),
     lambda m, who: f"{who or 'The RNN'} takes input_size {m[1]} but the input's last dimension is {m[2]} (with "
                    "batch_first=False the input is (T, N, features))."),
    (re.compile(r"shape '\[([^\]]*)\]' is invalid for input of size (\d+)"),
     lambda m, who: f"A view or reshape to [{m[1]}] cannot hold {m[2]} elements: the tensor is not the size "
                    "the code assumes (a last, smaller batch; an input of another size)."),
    (re.compile(r"Given normalized_shape=\[([^\]]*)\], expected input with shape \[\*, ([^\]]*)\], but got "
                r"input of size\s*\[([^\]]*)\]"),
     lambda m, who: f"{who or 'The LayerNorm'} normalises over [{m[1]}] but its input is [{m[3]}]: its normalized_shape must be "
                    "the input's last dimension(s)."),
    (re.compile(r"was expecting embedding dimension of (\d+), but got (\d+)"),
     lambda m, who: f"{who or 'The MultiheadAttention'} was made with embed_dim {m[1]} but its query's last dimension is {m[2]} (with "
                    "batch_first=False the input is (T, N, E))."),
]


def _dtype_advice(dtypes: list[str], who: str | None) -> str:
    """Which of the two dtypes is the odd one, and where it usually comes from."""
    names = " and ".join(dtypes)
    lowered = {d.lower() for d in dtypes}
    if lowered & {"double", "float64"}:
        why = ("float64 (Double) usually comes from NumPy, whose dtype torch.from_numpy keeps: convert the batch "
               "with .float() (or the model with .double()).")
    elif lowered & {"half", "bfloat16", "float16"}:
        why = ("a half-precision tensor met a float32 one outside autocast: run the op inside torch.autocast, or "
               "cast one side (.float(), or the model with .half()).")
    elif lowered & {"long", "int", "int64", "int32", "bool", "byte", "char", "short"}:
        why = ("an integer tensor (labels, indices, a mask) went into a floating-point op: convert it with .float() "
               "where a value is meant.")
    else:
        why = "cast one side so that both match."
    return f"Tensors of two dtypes ({names}) met" + (f" in {who}" if who else "") + ": " + why


def advise(text: str, module: str | None = None) -> str | None:
    """What to change for one of PyTorch's common training errors (``_ADVICE``), else None."""
    for pattern, make in _ADVICE:
        m = pattern.search(text)
        if m:
            return make(m, module)
    return None
