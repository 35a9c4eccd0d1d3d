"""One rank's torch.profiler Chrome trace -> time per phase, per loop iteration, compute vs exposed communication.

Our own reading of the trace, not Holistic Trace Analysis: HTA reads GPU kernel timelines only (a CPU/gloo trace
has none) and is not a dependency here. The reading follows the named ranges the code records
(`mythos:step`, `mythos:data`, `mythos:prelude`, `mythos:loop<t>:grad|nograd`, `mythos:coda`, `mythos:head`,
`mythos:loss`, `mythos:backward`, `mythos:clip_grad`, `mythos:optimizer`, `mythos:router_bias`):

- Host reading (CPU runs): the training thread's events nest, and every microsecond of a `mythos:step` belongs to
  the innermost range around it, so the phases add up to the step by construction. Time inside an autograd
  `evaluate_function` belongs to the backward of the forward phase that created that autograd node (matched by
  sequence number); a loop range entered during backward is that iteration's activation-checkpoint recompute.
- Communication: time inside a collective op, a `wait_tensor`, or FSDP's all-gather / reduce-scatter ranges is
  *exposed* communication of that kind: the training thread waited instead of computing. FSDP's hooks run outside
  the block they serve, so they count for it by their unit name, read off the model's parallel plan (`(coda.0)` ->
  coda; the loop unit `(recurrent)` -> `loop`, the loop as a whole). The collectives
  themselves run on gloo's threads (`gloo:*` events); the part of that which ran while the training thread computed
  is *overlapped*.
- Device reading (traces with GPU kernels): a kernel takes the phase of the host op that launched it (correlation
  id); NCCL kernels are communication, exposed where no compute kernel runs at the same moment; the rest of the
  step is `idle` (the device waited for the host).
"""

from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mythos_train.model.parallel_plan import ParallelPlan

STEP_RANGE = "mythos:step"
_LOOP = re.compile(r"mythos:loop(\d+):(grad|nograd)")
_FSDP_KINDS = (
    ("FSDP::post_backward_reduce", "reduce_scatter"),
    ("FSDP::post_backward_rs_wait", "reduce_scatter"),
    ("FSDP::all_gather", "all_gather"),
    ("FSDP::pre_forward", "all_gather"),  # waits for its all-gather
    ("FSDP::pre_backward", "all_gather"),
    ("FSDP::backward_prefetch", "all_gather"),
)
_OP_KINDS = (("all_to_all", "all_to_all"), ("alltoall", "all_to_all"), ("all_gather", "all_gather"),
             ("allgather", "all_gather"), ("reduce_scatter", "reduce_scatter"), ("allreduce", "all_reduce"),
             ("all_reduce", "all_reduce"), ("sendrecv", "all_to_all"), ("broadcast", "broadcast"))  # fmt: skip
_FSDP_UNIT = re.compile(r"\(([^()]+)\)$")
"FSDP2 names its hooks' ranges after the unit, e.g. 'FSDP::pre_forward (coda.0)': its traffic is that phase's."
COMM_KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "broadcast", "other")


def fsdp_unit_phases(plan: ParallelPlan) -> dict[str, str]:
    """FSDP unit path (the model's plan) -> the phase its hooks' traffic counts for: the loop unit and the loop block
    (a unit of its own under parallel.reshard_per_iteration) -> 'loop'; a dense block -> the range its container
    records (`coda.0` -> coda, as the model's `mythos:coda`)."""
    phases = {unit: unit.split(".")[0] for unit in plan.blocks}
    return phases | {plan.loop: "loop", plan.loop_block: "loop"}


def comm_kind(name: str, last_kind: str | None = None) -> str | None:
    """The collective kind an event's name stands for (None: not communication). A `wait_tensor` waits for the
    collective issued last on its thread."""
    for prefix, kind in _FSDP_KINDS:
        if name.startswith(prefix):
            return kind
    lowered = name.lower()
    if "wrap_tensor_autograd" in lowered:  # wraps a collective's result: no communication
        return None
    if "wait_tensor" in lowered or lowered == "c10d::wait":
        return last_kind or "other"
    if not ("c10d" in lowered or "nccl" in lowered or lowered.startswith("gloo:")):
        return None
    return next((kind for key, kind in _OP_KINDS if key in lowered.replace("_base", "")), "other")


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _covered(s: float, e: float, merged: list[tuple[float, float]], starts: list[float]) -> float:
    """Length of [s, e) covered by the sorted disjoint intervals `merged` (their starts in `starts`)."""
    i, total = max(0, bisect.bisect_right(starts, s) - 1), 0.0
    while i < len(merged) and merged[i][0] < e:
        total += max(0.0, min(e, merged[i][1]) - max(s, merged[i][0]))
        i += 1
    return total


@dataclass
class _Node:
    start: float
    end: float
    event: dict
    children: list[_Node] = field(default_factory=list)


def _forest(events: list[dict]) -> list[_Node]:
    """Complete events of one thread nested by time. An event that starts inside another and ends after it (e.g.
    `PythonDispatchMode` around a checkpoint's entry) is cut where the next one starts; rounding overruns (< 1 us)
    are clipped."""
    roots: list[_Node] = []
    stack: list[_Node] = []
    for ev in sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0))):
        node = _Node(ev["ts"], ev["ts"] + ev.get("dur", 0), ev)
        while stack and (stack[-1].end <= node.start or stack[-1].end + 1.0 < node.end):
            stack[-1].end = min(stack[-1].end, node.start)
            stack.pop()
        if stack:
            node.end = min(node.end, stack[-1].end)
            stack[-1].children.append(node)
        else:
            roots.append(node)
        stack.append(node)
    return roots


@dataclass
class TraceReading:
    """What one rank's trace says, summed over its profiled steps (divide by `steps` for per-step values), in ms."""

    steps: int
    step_ms: list[float]
    "Length of each `mythos:step` range."
    phases: dict[str, dict[str, float]]
    "Phase -> {'compute': ms, <collective kind>: exposed ms, ...}."
    occurrences: dict[str, int]
    "Forward / recompute phase -> how many times its range ran (micro-batches x steps)."
    in_flight_ms: float
    "Communication in progress (gloo threads or NCCL kernels, plus the training thread's waits)."
    exposed_ms: float
    overlapped_ms: float
    memory_peak_rise: int
    "Largest rise of allocated bytes above a step's start."
    memory_peak_phase: str
    reading: str
    "'host' or 'device' (see the module docstring)."

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Reader:
    def __init__(self, unit_phases: dict[str, str]) -> None:
        self.unit_phases = unit_phases
        self.phases: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.occurrences: dict[str, int] = defaultdict(int)
        self.seq_phase: dict[int, str] = {}
        self.correlation: dict[int, str] = {}
        self.segments: list[tuple[float, float, str]] = []  # training thread: (start, end, phase), in time order
        self.blocked: list[tuple[float, float]] = []
        self.last_kind: str | None = None

    def phase_at(self, ts: float) -> str:
        i = bisect.bisect_right(self.segments, (ts, float("inf"), "")) - 1
        return self.segments[i][2] if i >= 0 and self.segments[i][1] >= ts else "other"

    def visit(self, node: _Node, phase: str, backward: bool, comm: str | None, record: bool) -> None:
        """Assign node's self time (time not in a child) to (phase, comm kind) given the context of its parents."""
        ev, name = node.event, node.event["name"]
        args = ev.get("args", {})
        if name.startswith("mythos:") and name != STEP_RANGE:
            if loop := _LOOP.fullmatch(name):
                t, grad = loop.groups()
                phase = f"loop{t} recompute" if backward else f"loop{t}" + ("" if grad == "grad" else " nograd")
            elif name == "mythos:backward":
                backward, phase = True, "other bwd"
            else:
                phase = name.removeprefix("mythos:")
            if record and (backward is False or phase.endswith("recompute")):
                self.occurrences[phase] += 1
        elif name.startswith("autograd::engine::evaluate_function"):
            backward = True
            phase = self.seq_phase.get(args.get("Sequence number", -1), "other") + " bwd"
        elif name.startswith("FSDP::") and (unit := _FSDP_UNIT.search(name)) and unit[1] in self.unit_phases:
            phase = self.unit_phases[unit[1]] + (" bwd" if backward else "")
        elif not backward and "Sequence number" in args:
            # ops read the next sequence number without taking it: the last one to carry it created the node
            self.seq_phase[args["Sequence number"]] = phase
        if comm is None and (kind := comm_kind(name, self.last_kind)) is not None:
            comm = kind
            if "wait" not in name:
                self.last_kind = kind
        if "correlation" in args:
            self.correlation[args["correlation"]] = phase
        cursor = node.start
        for child in [*node.children, None]:
            gap_end = child.start if child is not None else node.end
            if record and gap_end > cursor:
                self.phases[phase][comm or "compute"] += (gap_end - cursor) / 1e3
                self.segments.append((cursor, gap_end, phase))
                if comm is not None:
                    self.blocked.append((cursor, gap_end))
            if child is not None:
                self.visit(child, phase, backward, comm, record)
                cursor = max(cursor, child.end)


def read_trace(trace: dict | str | Path, plan: ParallelPlan) -> TraceReading:
    """Read one rank's exported Chrome trace (dict or path) of the model whose parallel plan is `plan` into a
    TraceReading; see the module docstring."""
    if not isinstance(trace, dict):
        trace = json.loads(Path(trace).read_text())
    events = trace["traceEvents"]
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
    steps = sorted((e for e in complete if e["name"] == STEP_RANGE), key=lambda e: e["ts"])
    if not steps:
        raise ValueError(f"no {STEP_RANGE!r} range in the trace: was it recorded by `python -m mythos_train profile`?")
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in steps]
    main_tid = steps[0]["tid"]
    by_thread: dict = defaultdict(list)
    for e in complete:
        if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function"):
            by_thread[e["tid"]].append(e)
    reader = _Reader(fsdp_unit_phases(plan))
    for root in _forest(by_thread.pop(main_tid)):
        if root.event["name"] == STEP_RANGE:
            reader.visit(root, "other", False, None, record=True)
    for thread_events in by_thread.values():  # other host threads: GPU backward launches, gloo's own work
        for root in _forest(thread_events):
            reader.visit(root, "other bwd", True, None, record=False)

    kernels = [e for e in complete if e.get("cat") == "kernel" and any(s <= e["ts"] < t for s, t in windows)]
    if kernels:
        in_flight, exposed, overlapped = _device_reading(reader, kernels, windows)
    else:
        gloo = [(e["ts"], e["ts"] + e["dur"]) for e in complete if e["name"].startswith("gloo:")]
        gloo = [(max(s, ws), min(e, we)) for s, e in gloo for ws, we in windows if s < we and e > ws]
        exposed = _union_length(reader.blocked) / 1e3
        in_flight = _union_length(gloo + reader.blocked) / 1e3
        overlapped = in_flight - exposed
    peak, peak_phase = _memory_peak(events, windows, reader, device_type=1 if kernels else 0)
    return TraceReading(
        steps=len(steps),
        step_ms=[(e - s) / 1e3 for s, e in windows],
        phases={p: dict(v) for p, v in reader.phases.items()},
        occurrences=dict(reader.occurrences),
        in_flight_ms=in_flight,
        exposed_ms=exposed,
        overlapped_ms=overlapped,
        memory_peak_rise=peak,
        memory_peak_phase=peak_phase,
        reading="device" if kernels else "host",
    )


def _device_reading(reader: _Reader, kernels: list[dict], windows: list[tuple[float, float]]) -> tuple:
    """Replace the host phases by kernel time per launching phase; returns (in flight, exposed, overlapped) ms."""
    compute = _merge([(k["ts"], k["ts"] + k["dur"]) for k in kernels if comm_kind(k["name"]) is None])
    starts = [s for s, _ in compute]
    phases: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    in_flight = exposed = 0.0
    for k in kernels:
        phase = reader.correlation.get(k.get("args", {}).get("correlation", -1), "other")
        kind = comm_kind(k["name"])
        if kind is None:
            phases[phase]["compute"] += k["dur"] / 1e3
            continue
        hidden = _covered(k["ts"], k["ts"] + k["dur"], compute, starts)
        phases[phase][kind] += (k["dur"] - hidden) / 1e3
        in_flight, exposed = in_flight + k["dur"] / 1e3, exposed + (k["dur"] - hidden) / 1e3
    busy = sum(sum(v.values()) for v in phases.values())
    phases["idle"]["compute"] = max(0.0, sum(e - s for s, e in windows) / 1e3 - busy)
    reader.phases = phases
    return in_flight, exposed, in_flight - exposed


def _memory_peak(
    events: list[dict], windows: list[tuple[float, float]], reader: _Reader, device_type: int
) -> tuple[int, str]:
    """(largest rise of the allocator's total within a step above its value at the step's start, phase then)."""
    memory = sorted(
        (e["ts"], e["args"]["Total Allocated"])
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == device_type
    )
    best, best_ts = 0, None
    for start, end in windows:
        i = bisect.bisect_left(memory, (start, float("-inf")))
        base = memory[i - 1][1] if i > 0 else (memory[i][1] if i < len(memory) else 0)
        while i < len(memory) and memory[i][0] < end:
            if memory[i][1] - base > best:
                best, best_ts = memory[i][1] - base, memory[i][0]
            i += 1
    return int(best), reader.phase_at(best_ts) if best_ts is not None else "none"
