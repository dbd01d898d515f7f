"""The brevitas back end of the weight quantization: brevitas' per-output-channel power-of-two scales
(`Int8WeightPerChannelFixedPoint[MSE]`), made fast and lean enough for SDT-8-768 on a 2-core machine.

The numeric contract (`sdt_deploy.quant.contract`) asks one thing of this module: for a float weight,
brevitas' scale per output channel and the integers with `value = w_int * scale`. Everything here is
about getting brevitas to answer that quickly and in bounded memory, and each choice was measured
(SDT-8-768, 66 M weights, 2-core AMD EPYC, Nov 29 - Dec 3 2026; BENCHMARKS.md):

- **Pruned MSE search** (`_prune_mse_grid_search`): brevitas' grid search evaluates its loss at 20
  candidate scales per channel, but with a power-of-two restriction they fall on ~5 distinct scales, and
  a lower bound of the loss (the clipping error alone) rules most of them out. brevitas' own loss is
  evaluated only where a scale can win: ~2 evaluations instead of 20 (7.6 s -> 2.1 s). The choice stays
  brevitas': tests compare with brevitas run plainly, and a mutation test shows they catch over-pruning.
- **float32** weights (the model's own precision; float64 doubled the MSE search's time).
- **Blocks of rows** (`CHUNK_ELEMENTS`): every channel is quantized on its own, so the rows go to brevitas
  a block at a time; its temporaries then stay in reused heap memory (10.7 s -> 7.6 s: page faults).
- **A thread pool** over layers (`weights_ahead`), torch's ops on one intra-op thread each
  (`quiet_single_threaded`): torch releases the GIL in brevitas' tensor operations.
- **One glibc heap for the pool's threads** (`_one_heap_for_new_threads`, `mallopt(M_ARENA_MAX, 1)` while
  they start) and one `malloc_trim` at the end (`heap.release_freed_memory`): per-thread arenas kept each
  thread's freed temporaries (peak 772 MiB, 3.0x the checkpoint); a trim after every weight brought that
  to 668 MiB but cost 0.4 s of page faults; one shared heap gives ~700 MiB at the faster time.
No effect on the values: the same integers with one thread or four, with or without the heap tuning,
with or without the pruning (tests).
"""
from __future__ import annotations

import collections
import contextlib
import os
import warnings
from concurrent.futures import Future
from typing import Iterable, Iterator, Optional, TypeVar

import numpy as np
import torch

from sdt_deploy.errors import DeployError
from sdt_deploy.heap import libc, release_freed_memory
from sdt_deploy.quant.brevitas_import import import_brevitas

T = TypeVar("T")


def _brevitas_quantizer(search: str):
    import_brevitas()
    from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint, Int8WeightPerChannelFixedPointMSE

    return Int8WeightPerChannelFixedPointMSE if search == "mse" else Int8WeightPerChannelFixedPoint


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to n for the block. The quantizer's tensors are small (a block of
    one layer) and its operations many: measured on a 2-core machine under load, 2 threads made
    brevitas' MSE search 6x slower than 1 (OpenMP workers waiting for a core); on the idle machine 2
    were 1.45x faster. One is the predictable choice; the results do not depend on it (checked)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _distinct_scale_slots(scales: np.ndarray, mask: np.ndarray) -> list:
    """Slots of candidate rows, [C] each: for every channel (column), the first masked row of each of
    its distinct masked scales appears in one slot, largest scale first (a channel with fewer repeats
    its last; one with none has -1 throughout)."""
    remaining, columns, slots = mask.copy(), np.arange(scales.shape[1]), []
    while remaining.any():
        big = np.where(remaining, scales, -np.inf).max(axis=0)
        rows = np.where(remaining.any(axis=0), (remaining & (scales == big[None, :])).argmax(axis=0), -1)
        if slots:
            rows = np.where(rows >= 0, rows, slots[-1])
        slots.append(rows)
        taken = rows >= 0
        remaining &= ~((scales == scales[np.maximum(rows, 0), columns][None, :]) & taken[None, :])
    return slots


def _prune_mse_grid_search(proxy) -> None:
    """Make brevitas' MSE scale search evaluate only the power-of-two scales that can win.

    brevitas' grid search (`mse_grid_search`, 20 candidates between absmax/20 and absmax) quantizes
    the whole weight tensor once per candidate, but with a power-of-two restriction the 20 candidates
    of a channel map to only ~5 distinct scales, and a channel's loss depends on its own scale alone
    (zero point 0, fixed bit width; the loss is a per-row sum over the same row in a tensor of the same
    shape). So: map every candidate to its scale with brevitas' own scaling modules (cheap, one value
    per channel); evaluate brevitas' own loss at each channel's largest scale; then at each other
    scale unless a lower bound of its loss (the error of clipping the channel's weights to that scale's
    range, alone) already exceeds that loss, in which case the bound stands in for it (it can never be
    the minimum);
    and let brevitas' unchanged `mse_grid_search` run on those values. About 2 full evaluations
    instead of 20 (SDT-8-768: 7.6 s -> 2.1 s with the float32 weights). Any candidate whose scale was
    not tabulated falls back to brevitas' evaluation, so the choice is brevitas' whatever the grid
    (tests compare with brevitas run plainly). Searches of another kind (fibonacci, bipolar) are left
    alone."""
    import_brevitas()
    from brevitas.core.stats.stats_op import MSE

    mses = [m for m in proxy.modules() if isinstance(m, MSE)]
    riq = getattr(proxy, "tensor_quant", None)
    if len(mses) != 1 or riq is None or not hasattr(riq, "scaling_impl"):
        return
    mse = mses[0]
    if mse.search_method != "grid" or mse.bipolar_search or mse.num < 2:
        return
    original = mse.evaluate_loss
    state: dict = {}

    def scales_of(x, candidates: list) -> torch.Tensor:
        """The per-channel scales brevitas' quantizer uses for these candidates (what evaluate_loss
        would run), [len(candidates), C]: its own scaling modules in its local-loss mode."""
        mse.set_local_loss_mode(True)
        mse.set_observer_mode(False)
        try:
            out = []
            for candidate in candidates:
                mse.internal_candidate = candidate
                scale = riq.scaling_impl(x, riq.int_scaling_impl(riq.msb_clamp_bit_width_impl()))
                out.append(scale.detach().reshape(-1))
        finally:
            mse.set_local_loss_mode(False)
            mse.restore_observer_mode()
        return torch.stack(out)

    def scales_stacked(candidates: list):
        """All candidates' scales at once: brevitas' scale restriction is element-wise, and its
        local-loss forward is `stats_scaling_impl(candidate + 0 * value, threshold)`; one call instead of
        one per candidate. None where that structure is not there (checked against `scales_of` below)."""
        impl = riq.scaling_impl
        restrict, value = getattr(impl, "stats_scaling_impl", None), getattr(impl, "value", None)
        if restrict is None or not isinstance(value, torch.Tensor):
            return None
        try:
            stacked = torch.stack([c.reshape(value.shape) for c in candidates])
            out = restrict(stacked + 0. * value, riq.int_scaling_impl(riq.msb_clamp_bit_width_impl()))
        except (RuntimeError, TypeError, ValueError):
            return None
        return out.detach().reshape(len(candidates), -1)

    def tabulate(x, first):
        # the candidates exactly as brevitas' mse_search and mse_grid_search form them
        view = mse.input_view_shape_impl(x).detach()
        init = mse.mse_init_op(view).detach()
        base = mse.mse_base_op(init)
        xl, xr = torch.minimum(base, init), torch.maximum(base, init)
        if first.shape != xl.shape or not torch.equal(first, xl):
            return None
        n = mse.num
        cands = [xl] + [(xl + (xr - xl) * ts).detach() for ts in torch.linspace(1. / (n - 1), 1., n - 1)]
        flat = torch.stack([c.reshape(-1) for c in cands])                  # [n, C]
        scales = scales_stacked(cands)                                       # [n, C]
        if scales is None or scales.shape != flat.shape or view.dim() != 2 or view.shape[0] != flat.shape[1]:
            return None
        s, cols = scales.numpy(), torch.arange(flat.shape[1])
        bits = riq.msb_clamp_bit_width_impl()
        top = max(abs(float(riq.int_quant.max_int(bits))), abs(float(riq.int_quant.min_int(bits))))
        magnitude = view.abs()

        def brevitas_loss(rows):
            """brevitas' own scale and loss with each channel's candidate `rows`, its scale checked
            against its own scale path"""
            vec = flat[rows, cols].reshape(xl.shape)
            got = scales_of(x, [vec])
            if not torch.equal(got[0], scales[rows, cols]):
                return None
            loss = original(x, vec)
            state["loss_shape"] = loss.shape
            return got[0], loss.detach().reshape(-1)

        def clipping(rows):
            """a lower bound of brevitas' loss (the per-channel sum of squared errors) at each channel's
            scale in `rows`: an integer of at most `top` in magnitude times the scale comes no closer to
            a weight w than |w| - top * scale. Summed in float32 on the very values brevitas sees and
            lowered by 0.1 %, more than float32's summation error over a row, so still a lower bound."""
            reach = (top * scales[rows, cols].double()).to(magnitude.dtype)[:, None]   # exact: a power of two
            bound = (magnitude - reach).clamp_(min=0.0).square_().sum(dim=1)
            return bound.double() * (1.0 - 1e-3)

        # 1. each channel's largest scale (the one that clips least): brevitas' loss there
        largest = torch.from_numpy(s.argmax(axis=0))
        head = brevitas_loss(largest)
        if head is None:
            return None
        table_scales, table_losses = [head[0]], [head[1]]
        # 2. each other scale: brevitas' loss where its clipping alone does not already lose to that
        #    (1 % margin: brevitas sums in float32); where it does, it can never be the minimum, and
        #    the bound stands in for its loss
        other = s != s[largest.numpy(), np.arange(s.shape[1])][None, :]
        for slot in _distinct_scale_slots(s, other):
            has = torch.from_numpy(slot >= 0)
            rows = torch.where(has, torch.from_numpy(slot), largest)
            bound = clipping(rows)
            hopeful = has & (bound <= 1.01 * head[1].double())
            loss = head[1]
            if bool(hopeful.any()):
                got = brevitas_loss(torch.where(hopeful, rows, largest))
                if got is None:
                    return None
                loss = got[1]
            table_scales.append(scales[rows, cols])
            table_losses.append(torch.where(hopeful | ~has, loss, bound.to(loss.dtype)))
        state["candidates"] = (cands, scales)
        return torch.stack(table_scales), torch.stack(table_losses)

    def evaluate_loss(x, candidate):
        if "table" not in state:
            state["table"] = tabulate(x, candidate)
        table = state["table"]
        if table is not None:
            scales, losses = table
            cands, cand_scales = state["candidates"]
            k = state.get("calls", 0)
            state["calls"] = k + 1
            if k < len(cands) and candidate.shape == cands[k].shape and torch.equal(candidate, cands[k]):
                scale = cand_scales[k]
            else:
                scale = scales_of(x, [candidate])[0]
            hit = scales == scale[None, :]                                   # [J, C]
            if bool(hit.any(dim=0).all()):
                mse.internal_candidate = candidate
                row = hit.to(torch.int8).argmax(dim=0)
                return losses.gather(0, row[None, :]).reshape(state["loss_shape"])
        return original(x, candidate)

    mse.evaluate_loss = evaluate_loss


@contextlib.contextmanager
def quiet_single_threaded():
    """One torch intra-op thread (see `_torch_threads`) and brevitas' warnings silenced, entered once
    around a whole graph's quantization rather than per weight."""
    with _torch_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


CHUNK_ELEMENTS = 1 << 20   # weight values brevitas quantizes at once (4 MiB of float32)


def scales_and_integers(weight: np.ndarray, bits: int, search: str) -> tuple[np.ndarray, np.ndarray]:
    """brevitas' per-output-channel quantization of the weight, flattened to [O, -1]: (scale float64 [O],
    w_int int8 [O, -1]) with brevitas' dequantized value = w_int * scale. Runs inside
    `quiet_single_threaded`.

    brevitas works on the weight in float32, the precision the float model computes with (the folded
    float64 weight rounded once); float64 doubled the time of its MSE search (memory-bound: ~10
    temporaries per candidate) for a difference only where a weight sits within float32's rounding of
    a half-step.

    Every output channel is quantized on its own (its own scale search over its own row), so the rows
    go to brevitas a block of about CHUNK_ELEMENTS values at a time: the same result (checked equal on
    SDT-8-768 and every test model), while brevitas' temporaries stay in reused heap memory instead of
    fresh pages (measured on SDT-8-768: 10.7 s -> 7.6 s, the difference page faults); each block's
    values go into the int8 result at once."""
    import_brevitas()
    from brevitas.nn import QuantLinear

    flat = np.ascontiguousarray(weight.reshape(weight.shape[0], -1), dtype=np.float32)
    rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    limit = 2 ** (bits - 1) - 1
    # the results, made before the block temporaries: one long-lived allocation per weight, not one per
    # block between them (which would fragment the heap the temporaries are reused from)
    scales, ints = np.empty(flat.shape[0]), np.empty(flat.shape, dtype=np.int8)
    for start in range(0, flat.shape[0], rows):
        block = torch.from_numpy(flat[start:start + rows])
        with torch.no_grad():
            # built with one input feature, then given the block as the weight's data: the same
            # Parameter object (the one brevitas' scale statistics track), without the random
            # initialisation of a full-size weight (half the construction time)
            layer = QuantLinear(1, block.shape[0], bias=False, weight_quant=_brevitas_quantizer(search),
                                weight_bit_width=bits, dtype=torch.float32)
            layer.weight.data = block
            layer.eval()
            _prune_mse_grid_search(layer.weight_quant)
            qw = layer.quant_weight()
            scale = qw.scale.detach().reshape(-1, 1)
            # brevitas' value is an integer times its power-of-two scale in float32, so the division is
            # exact and the rounding changes nothing; a scale that is not a power of two is refused in
            # `_weight_integers`
            w_int = torch.round(qw.value.detach() / scale)
        if bool((w_int.abs() > limit).any()):
            raise DeployError(f"brevitas returned integers outside the {bits}-bit range")
        stop = start + block.shape[0]
        scales[start:stop] = scale.reshape(-1).double().numpy()
        ints[start:stop] = w_int.numpy()
    return scales, ints


M_ARENA_MAX = -8        # glibc's malloc.h


@contextlib.contextmanager
def _one_heap_for_new_threads():
    """The threads started inside the block allocate from the heap that already exists, not each from
    a heap (glibc "arena") of its own.

    glibc gives a thread that allocates under contention an arena of its own and keeps what the thread
    frees there for that thread's next allocation. The quantizer threads' brevitas temporaries (tens
    of MiB a weight block) then stay with each thread: SDT-8-768's export peaked at 772 MiB (3.0x its
    checkpoint). Handing the freed memory back after each weight (malloc_trim) brought that to 668 MiB
    but made every weight fault its temporaries in again (0.4 s of a 3.8 s export). One shared heap
    lets each thread reuse what the other freed: ~700 MiB at the faster time (measured, 4 runs each).
    The limit applies only to arenas made while it is set (a thread keeps its heap), so it is lifted
    again afterwards (`arena_max_after`). No effect off glibc."""
    mallopt = libc("mallopt")
    if mallopt is None or mallopt(M_ARENA_MAX, 1) != 1:
        yield
        return
    try:
        yield
    finally:
        mallopt(M_ARENA_MAX, arena_max_after(os.environ))


def arena_max_after(environ) -> int:
    """The arena limit to restore: the user's own (MALLOC_ARENA_MAX, or glibc.malloc.arena_max in
    GLIBC_TUNABLES, both read by glibc at start-up), else glibc's default for 64-bit, 8 per CPU."""
    tunables = dict(item.partition("=")[::2] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item)
    for value in (tunables.get("glibc.malloc.arena_max"), environ.get("MALLOC_ARENA_MAX")):
        if value and value.strip().isdigit() and int(value) > 0:
            return int(value)
    return 8 * (os.cpu_count() or 1)


def quantization_workers() -> int:
    """Threads for the weight quantization: the CPUs this process may use, at most 4 (brevitas' search
    is memory-bound; more threads than that only compete for the memory bus)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


@contextlib.contextmanager
def quantizer_session():
    """Around one whole graph's quantization: brevitas imported (before any worker thread: the import
    is bound to the GIL anyway), one torch intra-op thread, brevitas' warnings silenced; on the way out,
    the heap memory its temporaries used handed back to the OS."""
    import_brevitas()
    with quiet_single_threaded():
        yield
    # what comes next (the export's serialized model, 64 MiB for SDT-8-768) would otherwise be
    # allocated beside ~80 MiB of free heap that no longer serves anything
    release_freed_memory()


def weights_ahead(items: Iterable[tuple[T, Optional[np.ndarray]]], bits: int, search: str,
                  workers: Optional[int] = None) -> Iterator[tuple[T, Optional[Future]]]:
    """(item, future of `scales_and_integers(weight, bits, search)` or None) in the order given, the
    weights of up to 2 * workers items being quantized ahead on a thread pool. Each weight is quantized on
    its own (per output channel, nothing shared), and torch releases the GIL inside brevitas' tensor
    operations, so the layers run in parallel (each op on one intra-op thread: `quiet_single_threaded`
    around the caller, torch's setting being process-wide); the bounded window keeps the streamed float
    weights of only a few layers alive at once. Runs inside `quantizer_session`."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or quantization_workers()
    pending: collections.deque = collections.deque()
    in_flight = 0
    with _one_heap_for_new_threads(), \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantize") as pool:
        try:
            for item, weight in items:
                job = None if weight is None else pool.submit(scales_and_integers, weight, bits, search)
                pending.append((item, job))
                in_flight += job is not None
                while in_flight > 2 * workers:      # the window counts weights, not items
                    done = pending.popleft()
                    in_flight -= done[1] is not None
                    yield done
            while pending:
                yield pending.popleft()
        finally:
            for _, job in pending:      # stopped early (an error downstream): drop what has not started
                if job is not None:
                    job.cancel()
