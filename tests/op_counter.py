"""Counting dispatched aten operations on the CPU: the launch count a fast GPU pays for (issue 19).

On a GPU that waits on the CPU, a step costs about what it launches, so the number of non-view aten operations is
the CPU's measure of GPU speed; host synchronisations stall the GPU queue whatever their count, so they are counted
apart. Used by tests/benchmarks/bench_op_count.py and by the tests that keep the UNet call free of host syncs.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations that make the host wait for the device (a value read back, a data-dependent shape, a comparison
# answered on the host), or that copy host data into a tensor (torch.tensor / as_tensor of Python values: a
# host-to-device copy when the tensor goes to a GPU).
SYNC_OPS = {
    aten.item.default: "item",                     # .item(), float(t), int(t) (seen as item or as
    aten._local_scalar_dense.default: "item",      # _local_scalar_dense, whichever the mode sees first)
    aten.is_nonzero.default: "item",
    aten.equal.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "nonzero",
    aten.lift_fresh.default: "host data",          # torch.tensor(python values)
    aten.lift_fresh_copy.default: "host data",
}


# Not views by their schema, but metadata only on every backend: no kernel is launched.
NO_KERNEL = {aten._unsafe_view.default}


def _moved(func, args, kwargs) -> bool:
    """A copy to another device (.to(device), copy_ across devices): a transfer on a GPU machine. On the CPU it
    shows under the device-move emulation (tests/device_moves.py), whose load device is cpu:0."""
    if func is aten._to_copy.default and "device" in kwargs and torch.is_tensor(args[0]):
        return kwargs["device"] is not None and torch.device(kwargs["device"]) != args[0].device
    if func is aten.copy_.default and torch.is_tensor(args[1]):
        return args[0].device != args[1].device
    return False


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c:` counts every dispatched non-view aten op (NO_KERNEL ones left out too) (`c.ops`) and every host sync by kind
    (`c.syncs`: "item", "nonzero", "host data", "device copy"); `c.by_op` names them."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs: Counter = Counter()
        self.by_op: Counter = Counter()
        self.sync_ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = SYNC_OPS.get(func) or ("device copy" if _moved(func, args, kwargs) else None)
        if kind is not None:
            self.syncs[kind] += 1
            self.sync_ops[str(func)] += 1
        if not func.is_view and func not in NO_KERNEL:
            self.ops += 1
            self.by_op[str(func)] += 1
        return func(*args, **kwargs)

    def snapshot(self) -> tuple[int, int]:
        """(ops, syncs) so far."""
        return self.ops, sum(self.syncs.values())
