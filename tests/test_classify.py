"""Classifying what the script raised: out of memory (CPU, CUDA) and DataLoader worker errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tui_debug.classify import classify_exception, human_bytes

from helpers import SCRIPTS, describe, findings, load_report, run_td


def test_cpu_out_of_memory_end_to_end(tmp_path: Path) -> None:
    proc = run_td("--out", tmp_path / "run", SCRIPTS / "cpu_oom.py", cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    assert "DefaultCPUAllocator" in proc.stderr, "the script's own traceback is printed"
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "crashed"
    memory = findings(report, "memory_error")
    assert len(memory) == 1, report["errors"]
    message = memory[0]["message"]
    assert re.search(r"\d+(\.\d+)? (TiB|GiB)", message), message
    assert "36.38 TiB" in message, message  # 4e13 bytes
    assert memory[0]["context"]["requested_bytes"] == 4 * 10**13
    assert memory[0]["recommendation"]
    assert not findings(report, "training_error")


def test_dataloader_worker_error_end_to_end(tmp_path: Path) -> None:
    proc = run_td("--out", tmp_path / "run", SCRIPTS / "worker_error.py", cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    report = load_report(tmp_path / "run")
    assert report["run"]["status"] == "crashed"
    data = findings(report, "data_error")
    assert len(data) == 1, report["errors"]
    finding = data[0]
    assert "bad sample 7" in finding["message"] or "bad sample 7" in finding["context"].get("original_traceback", "")
    assert finding["context"]["original_exception"] == "ValueError"
    assert "worker_error.py" in finding["context"]["original_traceback"]
    assert not findings(report, "training_error")


def _cuda_oom(message: str) -> BaseException:
    # torch.OutOfMemoryError is a RuntimeError subclass with this name; no GPU needed to build one.
    OutOfMemoryError = type("OutOfMemoryError", (RuntimeError,), {})
    return OutOfMemoryError(message)


CUDA_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
                "of which 1.06 GiB is free. Of the allocated memory 75.00 GiB is allocated by PyTorch, and "
                "1.20 GiB is reserved by PyTorch but unallocated.")


def test_cuda_out_of_memory_message() -> None:
    c = classify_exception(_cuda_oom(CUDA_MESSAGE))
    assert c.category == "memory_error"
    assert c.severity == "error"
    assert "2.00 GiB" in c.message
    assert c.context["requested"] == "2.00 GiB"
    assert c.recommendation


def test_cuda_out_of_memory_names_the_module() -> None:
    c = classify_exception(_cuda_oom(CUDA_MESSAGE), ["model.3 (Linear)", "model (Sequential)"])
    assert c.category == "memory_error"
    assert "model.3 (Linear)" in c.message
    assert c.context["module"] == "model.3 (Linear)"


def test_cuda_oom_text_in_a_plain_runtime_error() -> None:
    c = classify_exception(RuntimeError(CUDA_MESSAGE))
    assert c.category == "memory_error"
    assert "2.00 GiB" in c.message


def test_cpu_oom_message_unit() -> None:
    exc = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                       "memory: you tried to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)")
    c = classify_exception(exc)
    assert c.category == "memory_error"
    assert "3.00 GiB" in c.message
    assert c.context["requested_bytes"] == 3 * 2**30


def test_plain_exception_is_a_training_error() -> None:
    c = classify_exception(ValueError("shapes (3,4) and (5,6) not aligned"), ["model.1 (Bad)"])
    assert c.category == "training_error"
    assert c.context["module"] == "model.1 (Bad)"
    assert "model.1 (Bad)" in c.message and "not aligned" in c.message


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(2 * 2**30) == "2.00 GiB"
    assert human_bytes(4 * 10**13) == "36.38 TiB"


def test_labels_out_of_range_for_the_loss_are_a_data_error() -> None:
    import torch

    from tui_debug.classify import classify_exception

    try:
        torch.nn.functional.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 5, 2]))
    except Exception as exc:  # IndexError: Target 5 is out of bounds.
        c = classify_exception(exc, ["loss_fn (CrossEntropyLoss)"])
    else:  # pragma: no cover - torch always raises here
        raise AssertionError("cross_entropy accepted an out-of-range label")
    assert c.category == "data_error" and "labels out of range" in c.message and "Target 5" in c.message
    assert "number of classes" in c.recommendation


def test_an_exception_from_inside_an_iteration_belongs_to_the_step_in_progress() -> None:
    import torch

    from tui_debug.classify import raised_mid_step

    def raised(fn):
        try:
            fn()
        except Exception as exc:
            return exc
        raise AssertionError("did not raise")

    x = torch.ones(2, requires_grad=True)
    in_backward = raised(lambda: (x * 2).sum().backward(torch.ones(3)))  # a bad gradient shape
    assert raised_mid_step(in_backward, None)
    assert raised_mid_step(raised(lambda: 1 / 0), ["model.1 (Bad)"])  # from a model's forward
    # a loss called as a function (F.cross_entropy), as its module form (nn.CrossEntropyLoss) is: the
    # same error was filed a step apart by the form of the call
    import torch.nn.functional as F

    assert raised_mid_step(raised(lambda: F.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 7]))), None)
    # after the loop (saving, evaluation code of the script's own): the steps done
    assert not raised_mid_step(raised(lambda: open("/nonexistent/dir/file")), None)


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("it did not raise")


def _twice() -> None:
    x = torch.randn(3, requires_grad=True)
    y = (x * x).sum()
    y.backward()
    y.backward()


def _inplace() -> None:
    x = torch.randn(3, requires_grad=True)
    y = x.sigmoid()
    y.mul_(2)
    y.sum().backward()


# The errors PyTorch itself raises (so a change of wording in a new torch fails here), the module a
# forward was in when it happened, and what the advice must say.
COMMON_ERRORS = [
    (lambda: nn.Linear(21, 5)(torch.randn(4, 20)), "model.2 (Linear)",
     ["model.2 (Linear) takes 21 input features but was given 20", "in_features 20"]),
    (lambda: torch.randn(4, 20) @ torch.randn(21, 5), None, ["(4x20) by (21x5)", "inner sizes (20, 21)"]),
    (lambda: nn.Conv2d(3, 8, 3)(torch.randn(2, 1, 8, 8)), "model.0 (Conv2d)",
     ["model.0 (Conv2d) takes 3 input channels but was given 1", "permute(0, 3, 1, 2)"]),
    (lambda: nn.Linear(4, 2)(torch.randn(3, 4, dtype=torch.float64)), "model.0 (Linear)",
     ["two dtypes (Double and Float) met in model.0 (Linear)", "NumPy", ".float()"]),
    (lambda: torch.randn(3, 4) @ torch.randn(4, 2, dtype=torch.float64), None, ["two dtypes", "NumPy"]),
    (lambda: nn.Linear(4, 2)(torch.randn(3, 4).half()), None, ["(Half and Float)", "autocast"]),
    (lambda: nn.Linear(4, 2)(torch.ones(3, 4, dtype=torch.long)), None, ["(Long and Float)", "integer tensor"]),
    (lambda: F.cross_entropy(torch.randn(4, 3), torch.randn(4)), None, ["int64", "labels.long()"]),
    (lambda: torch.randn(3).sum().backward(), None, ["not connected to any trainable parameter", "no_grad"]),
    (_twice, None, ["h = h.detach()", "loss.item()"]),
    (_inplace, None, ["changed the output of Sigmoid", "out-of-place"]),
    (lambda: nn.Embedding(10, 4)(torch.tensor([3, 12])), "model.emb (Embedding)",
     ["model.emb (Embedding) was given an index beyond its size", "num_embeddings"]),
    (lambda: F.cross_entropy(torch.randn(8, 5), torch.randint(0, 5, (6,))), None,
     ["output has 8 rows and the labels 6", "view(-1"]),
    (lambda: (torch.randn(3, requires_grad=True) * 2).backward(), None, ["several elements", ".mean()"]),
    (lambda: torch.zeros(2).cuda(), None, ["has no CUDA (torch " + torch.__version__, "is_available()"]),
    (lambda: nn.BatchNorm1d(4)(torch.randn(1, 4)), "model.bn (BatchNorm1d)",
     ["model.bn (BatchNorm1d) in training mode was given a batch of one", "drop_last=True"]),
    (lambda: nn.LSTM(10, 20)(torch.randn(5, 3, 11)), "model.rnn (LSTM)",
     ["model.rnn (LSTM) takes input_size 10 but the input's last dimension is 11"]),
    (lambda: torch.randn(4, 6).view(5, -1), None, ["to [5, -1] cannot hold 24 elements"]),
    (lambda: nn.LayerNorm(8)(torch.randn(2, 7)), "model.ln (LayerNorm)",
     ["model.ln (LayerNorm) normalises over [8] but its input is [2, 7]"]),
    (lambda: nn.MultiheadAttention(32, 4)(*[torch.randn(5, 2, 30)] * 3), "model.attn (MultiheadAttention)",
     ["made with embed_dim 32 but its query's last dimension is 30"]),
]


@pytest.mark.parametrize("fn, module, says", COMMON_ERRORS)
def test_common_training_errors_get_advice_derived_from_them(fn, module, says) -> None:
    """"The script raised; the traceback shows where" told a user nothing they did not know: PyTorch's
    common errors now get what to change, with the sizes, dtypes and module of this error."""
    exc = _raised(fn)
    c = classify_exception(exc, [module] if module else None)
    assert c.category in ("training_error", "data_error")
    for phrase in says:
        assert phrase in c.recommendation, (phrase, c.recommendation)


def test_an_error_without_advice_keeps_the_general_recommendation() -> None:
    c = classify_exception(ValueError("my own check failed"))
    assert c.category == "training_error" and "traceback shows where" in c.recommendation


class _ReadTimeout(OSError):  # named as requests' (which this test does not import)
    pass


_ReadTimeout.__name__ = "ReadTimeout"


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


@pytest.mark.parametrize("exc, category", [
    (TimeoutError("timed out"), "timeout_error"),
    (_ReadTimeout("read timed out"), "timeout_error"),
    (RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(...) ran for 600000 ms"),
     "timeout_error"),
    (__import__("urllib.error").error.URLError(TimeoutError("timed out")), "timeout_error"),
    (__import__("urllib.error").error.URLError("[Errno -2] Name or service not known"), "network_error"),
    (ConnectionRefusedError(111, "Connection refused"), "network_error"),
    (__import__("http.client").client.RemoteDisconnected("Remote end closed connection"), "network_error"),
    (KeyError("lr"), "training_error"),
], ids=["TimeoutError", "requests-ReadTimeout", "NCCL-watchdog", "URLError-timeout", "URLError", "refused",
        "RemoteDisconnected", "KeyError"])
def test_waits_and_the_network_have_their_own_categories(exc: BaseException, category: str) -> None:
    c = classify_exception(exc)
    assert c.category == category, c
    assert type(exc).__name__ in c.message


def test_an_exception_whose_str_raises_is_still_classified() -> None:
    c = classify_exception(_Unprintable())
    assert (c.category, c.message) == ("training_error", "_Unprintable: <exception str() failed>")


def test_an_error_in_an_evaluation_pass_is_an_evaluation_error_of_the_last_step_done(tmp_path: Path) -> None:
    """model.eval() + no_grad() after 10 steps, a batch of the wrong width: not a training_error of a
    step 11 that never ran, and the advice starts from the evaluation data, not from the model."""
    script = tmp_path / "evaluate.py"
    script.write_text(
        "import torch, torch.nn as nn\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "for _ in range(10):\n"
        "    opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()\n"
        "model.eval()\n"
        "with torch.no_grad():\n"
        "    model(torch.randn(16, 5))\n", encoding="utf-8")
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    [found] = findings(load_report(tmp_path / "run"), "evaluation_error")
    assert found["step"] == 10 and "model.0 (Linear)" in found["message"], found
    assert found["recommendation"].startswith("Compare the evaluation batch"), found


def test_an_exception_whose_str_raises_is_the_scripts_crash_end_to_end(tmp_path: Path) -> None:
    script = tmp_path / "badstr.py"
    script.write_text("class Bad(Exception):\n    def __str__(self):\n        raise RuntimeError('no str')\n"
                      "raise Bad()\n", encoding="utf-8")
    proc = run_td("--out", tmp_path / "run", script, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    report = load_report(tmp_path / "run")
    assert [(e["category"], e["message"]) for e in report["errors"]] == [
        ("training_error", "Bad: <exception str() failed>")], report["errors"]
