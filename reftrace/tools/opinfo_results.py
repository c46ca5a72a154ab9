"""OpInfo sweep results and their report: the statuses a sample or op can have, and the markdown
coverage table (``docs/coverage.md``) written from one or more sweeps. ``reftrace.tools.opinfo``
runs the sweeps.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
from typing import Sequence

import torch

PASS = "pass"
EAGER_GRAD_WRONG = "pass (eager grad wrong)"
RANDOM = "pass (random)"
UNSUPPORTED = "unsupported"
CRASH = "crash"
TIMEOUT = "timeout"
WRONG_VALUE = "wrong value"
WRONG_GRAD = "wrong grad"
SKIP_EAGER = "skip: eager fails"
SKIP_NO_GRAD = "skip: no differentiable output"
SKIP_DTYPE = "skip: no float dtype on CPU"

# worst first: an op's status is its worst sample's
STATUSES = (WRONG_VALUE, WRONG_GRAD, CRASH, TIMEOUT, UNSUPPORTED, RANDOM, EAGER_GRAD_WRONG, PASS, SKIP_EAGER, SKIP_NO_GRAD, SKIP_DTYPE)
SEVERITY = {s: len(STATUSES) - i for i, s in enumerate(STATUSES)}
SKIPS = (SKIP_EAGER, SKIP_NO_GRAD, SKIP_DTYPE)



@dataclasses.dataclass(frozen=True)
class SampleResult:
    status: str
    message: str = ""


@dataclasses.dataclass
class OpResult:
    """One op variant on one backend: its status (worst sample), why, and how many samples ran."""

    name: str
    backend: str
    status: str
    message: str = ""
    dtype: str = ""
    samples: int = 0
    seconds: float = 0.0


_CATEGORIES = (
    ("pass", (PASS,)),
    ("pass, torch's eager gradient wrong (finite differences agree with reftrace)", (EAGER_GRAD_WRONG,)),
    ("pass, random op (shapes and backward checked)", (RANDOM,)),
    ("clear unsupported (ReftraceError)", (UNSUPPORTED,)),
    ("crash (other exception)", (CRASH, TIMEOUT)),
    ("wrong value", (WRONG_VALUE,)),
    ("wrong grad", (WRONG_GRAD,)),
    ("skipped: eager fails", (SKIP_EAGER,)),
    ("skipped: no differentiable output", (SKIP_NO_GRAD,)),
    ("skipped: no float dtype on CPU", (SKIP_DTYPE,)),
)


def summary_counts(results: Sequence[OpResult]) -> dict[str, int]:
    return {label: sum(r.status in statuses for r in results) for label, statuses in _CATEGORIES}


@dataclasses.dataclass
class Sweep:
    """One backend's results and how they were obtained (for the report)."""

    backend: str
    results: list[OpResult]
    command: str
    limit_samples: int | None = None
    time_limit: float | None = None

    def settings(self) -> str:
        samples = f"first {self.limit_samples} samples per op" if self.limit_samples else "all samples"
        limit = f", {self.time_limit:g} s per op" if self.time_limit else ""
        return f"{samples}{limit}: `{self.command}`"


def save_sweep(sweep: Sweep, path: str) -> None:
    with open(path, "w") as f:
        json.dump({**dataclasses.asdict(sweep), "results": [dataclasses.asdict(r) for r in sweep.results]}, f)


def load_sweep(path: str) -> Sweep:
    with open(path) as f:
        data = json.load(f)
    data["results"] = [OpResult(**r) for r in data["results"]]
    return Sweep(**data)


def write_report(sweeps: Sequence[Sweep], path: str) -> None:
    """Markdown: a summary per backend and one row per op variant (rows of the first sweep)."""
    backends = [s.backend for s in sweeps]
    by_name = [{(r.name, r.dtype): r for r in s.results} for s in sweeps]
    first = sweeps[0].results
    lines = ["# Operator coverage: torch's OpInfo database through reftrace", "",
             f"Generated on {datetime.date.today().isoformat()} with torch {torch.__version__} by "
             "`python -m reftrace.tools.opinfo` (`reftrace/tools/opinfo.py`):", ""]
    lines += [f"- **{s.backend}**: {s.settings()}" for s in sweeps]
    lines += ["",
              "Every OpInfo entry of `torch.testing._internal.common_methods_invocations.op_db` with "
              "`supports_autograd=True` (variants listed separately) runs on its sample inputs (float64 where the "
              "op supports it, else float32; and again in complex128, else complex64, where the op supports complex "
              "gradients: those rows show a complex dtype; torch's complex gradients are the conjugate Wirtinger "
              "convention of docs/complex.md), through its OpInfo `gradcheck_wrapper` as torch's own gradient tests "
              "call it, eagerly and through `reftrace.compile.aot_function(fn, compiler)`. It passes when the values "
              "and the gradients (`torch.autograd.grad` with one random cotangent per output) match eager within "
              "torch's tolerances (float64: rtol = atol = 1e-7, loosened where the OpInfo entry overrides them); "
              "an op may instead raise a `ReftraceError` that names what is unsupported. Where gradients disagree, "
              "central differences of eager's forward arbitrate (float64): an op counts as passing only if "
              "reftrace's gradient passes that check and eager's fails it. Random ops cannot match eager's values "
              "(reftrace draws from its own counter-based RNG): their output shapes and dtypes and a working "
              "backward are checked.", "", "## Summary", ""]
    lines += ["| | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    counts = [summary_counts(s.results) for s in sweeps]
    lines.append("| op variants | " + " | ".join(str(len(s.results)) for s in sweeps) + " |")
    for label, _ in _CATEGORIES:
        lines.append(f"| {label} | " + " | ".join(str(c[label]) for c in counts) + " |")
    lines.append("| **pass rate** (of variants checked) | " + " | ".join(_pass_rate(s.results) for s in sweeps) + " |")
    if any(is_complex_run(r) for s in sweeps for r in s.results):
        for label, keep in (("real dtypes", False), ("complex dtypes", True)):
            lines.append(f"| pass rate, {label} | " + " | ".join(
                _pass_rate([r for r in s.results if is_complex_run(r) == keep]) for s in sweeps) + " |")
    lines += _unsupported_summary(sweeps[0].results)
    lines += ["", "### Semantics that differ from torch's (documented, not counted as failures)", "",
              "- A captured graph cannot raise on values: where torch raises for a singular or indefinite matrix "
              "(`linalg.inv`, `linalg.solve`, `linalg.cholesky`, ...), reftrace returns inf/NaN, and the `info` "
              "outputs of the `_ex` variants are nonzero; `gaussian_nll_loss` with a negative variance, and `cov` / `corrcoef` with negative weights or weights summing to zero, give NaN.",
              "- Eigenvectors and singular vectors are unique up to sign; the xla backend's LAPACK calls may pick "
              "other signs than torch's (wide matrices in `svd`). Sign-invariant results and their gradients agree.",
              "- Complex eigenvectors (`linalg.eig`) and singular vectors are unique up to a phase each: for a loss "
              "that depends on that phase torch raises, reftrace returns a gradient (docs/complex.md#linear-algebra).",
              "- `topk(sorted=False)` returns the sorted order (torch leaves the order unspecified).",
              "- Random ops draw from reftrace's counter-based RNG (docs/torch.md#random-operators), not torch's "
              "generator stream.",
              "- `cov (complex128)`: its float32 `aweights` gradient (beside a complex128 input) is a sum of terms "
              "near 280 that cancel to about 1. `nop` rounds it as eager does (division's VJP in torch's order); "
              "the xla backend's rounding differs from eager's by 1.5e-5, which counts as a wrong gradient there; "
              "both are as far from the float64 gradient (6.4e-5)."]
    lines += ["", "## Every op variant", "",
              "| op variant | dtype | samples | " + " | ".join(backends) + " | why (first backend with a note) |",
              "|---|---|---|" + "---|" * len(backends) + "---|"]
    for r in first:
        row = [names.get((r.name, r.dtype)) for names in by_name]
        why = next((x.message for x in row if x is not None and x.message), "")
        statuses = " | ".join(x.status if x is not None else "—" for x in row)
        lines.append(f"| `{r.name}` | {r.dtype} | {r.samples} | {statuses} | {_md(why)} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def is_complex_run(result: OpResult) -> bool:
    return result.dtype.startswith("complex")


def _pass_rate(results: Sequence[OpResult]) -> str:
    counts = summary_counts(results)
    skipped = sum(counts[label] for label, statuses in _CATEGORIES if set(statuses) <= set(SKIPS))
    checked = len(results) - skipped
    ok = sum(counts[label] for label, statuses in _CATEGORIES if set(statuses) <= {PASS, RANDOM, EAGER_GRAD_WRONG})
    return f"{ok}/{checked} = {100.0 * ok / max(checked, 1):.1f}%"


def _reason(message: str) -> str:
    """A short cause for grouping unsupported ops in the report."""
    if "complex tensors" in message or "complex inputs" in message:
        return "complex inputs this op's rule refuses"
    if "data-dependent" in message or "DataDependentControlFlowError" in message:
        return "data-dependent: an output shape or a branch depends on tensor values"
    if "sparse" in message:
        return "sparse tensors"
    if "slice is neither a tensor nor a hashable constant" in message:
        return "`slice` arguments: aot_function cannot guard on them (unhashable in Python 3.11)"
    found = re.search(r"(\S+) has no reftrace mapping", message)
    return f"no ATen row for {found.group(1)}" if found else message[:100]


def _unsupported_summary(results: Sequence[OpResult]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for r in results:
        if r.status in (UNSUPPORTED, CRASH, TIMEOUT):
            groups.setdefault(_reason(r.message), []).append(f"{r.name} ({r.dtype})" if is_complex_run(r) else r.name)
    if not groups:
        return []
    lines = ["", f"### Not supported on {results[0].backend}, by cause", ""]
    for reason, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {reason} ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
    return lines


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def short(text: str, limit: int = 220) -> str:
    """One line of at most ``limit`` characters (messages in results and in the report)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"
