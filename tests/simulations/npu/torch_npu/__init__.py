"""SIMULATION of torch_npu for tests (see ../README.md): the names epplat calls, computed on the CPU.

"npu" is torch's PrivateUse1 device type whose allocations are CPU memory (tensors made
"on the npu" are CPU tensors), the "hccl" torch.distributed backend is a gloo process
group, and the quantized ops do their documented integer arithmetic in plain torch.
"""

from __future__ import annotations

import datetime
import os
import sys
import types
import weakref

import torch
import torch.distributed as dist
import torch.utils._device

if os.environ.get("SIM_NPU_BROKEN_CANN"):
    raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")

SIMULATED = True

# -- torch.npu -------------------------------------------------------------------------------
npu = types.ModuleType("torch_npu.npu")
_current = [0]


def _is_available() -> bool:
    return True


def _device_count() -> int:
    return int(os.environ.get("SIM_NPU_DEVICE_COUNT", "8"))


def _set_device(device) -> None:
    idx = device.index if isinstance(device, torch.device) else int(str(device).split(":")[-1])
    if not 0 <= idx < _device_count():
        raise RuntimeError(f"Invalid device ID {idx}")
    _current[0] = idx


# What torch holds on the simulated device: the bytes of every live storage made by the allocation kernels
# below, and their peak since reset_peak_memory_stats. torch_npu's queries read its caching allocator's
# statistics the same way (Ascend/pytorch torch_npu/npu/memory.py, read at commit 026318d: memory_allocated
# is "allocated_bytes.all.current", max_memory_allocated "allocated_bytes.all.peak", memory_reserved
# "reserved_bytes.all.current", as torch.cuda's); there is no caching here, so reserved equals allocated and empty_cache frees
# nothing. mem_get_info reports the host's memory (where "npu" tensors live), so the budget's "outside torch"
# term is every other use of it; SIM_NPU_HBM_BYTES=N makes it an N-byte device that only torch uses.
_stats = {"current": 0, "peak": 0}
_on_npu: dict = {}          # data_ptr -> bytes of every live storage made on the simulated device


def _allocated(t: torch.Tensor) -> torch.Tensor:
    storage = t.untyped_storage()
    n, ptr = storage.nbytes(), storage.data_ptr()
    _stats["current"] += n
    _stats["peak"] = max(_stats["peak"], _stats["current"])
    _on_npu[ptr] = n
    weakref.finalize(storage, _freed, ptr, n)      # the storage's Python object lives as long as the storage
    return t


def _freed(ptr: int, n: int) -> None:
    _stats["current"] -= n
    _on_npu.pop(ptr, None)


# Host memory the simulation can name: "npu" tensors are CPU tensors and ops on them run CPU kernels, so a
# computed tensor's device is unknown here; what is known to be host memory is what a factory made with no
# device (torch's default device is the CPU) and what .cpu() copied off the device. Those are refused by
# "hccl" groups (below); tensors made on the device, or computed, pass.
_on_host: dict = {}


def on_host(t: torch.Tensor) -> bool:
    """Whether `t` is known host memory (made without a device, or copied off the device by .cpu())."""
    return t.numel() > 0 and t.untyped_storage().data_ptr() in _on_host


def _host(t: torch.Tensor) -> torch.Tensor:
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    if ptr and ptr not in _on_npu:
        _on_host[ptr] = True
        weakref.finalize(storage, _on_host.pop, ptr, None)
    return t


def _made_on_host(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if kwargs.get("device") is None and not torch.compiler.is_compiling() and isinstance(t, torch.Tensor):
            _host(t)
        return t
    make.__name__ = make.__qualname__ = factory.__name__
    make._sim_npu = True
    return make


# `with torch.device(...)` gives a device to the factories of this cached set: fill it with torch's own
# functions first (the wrappers call them, so the context still reaches them)
torch.utils._device._device_constructors()
for _name in ("tensor", "zeros", "ones", "empty", "full", "arange"):
    if not hasattr(getattr(torch, _name), "_sim_npu"):
        setattr(torch, _name, _made_on_host(getattr(torch, _name)))
_tensor_cpu = torch.Tensor.cpu


def _cpu(self, *args, **kwargs):
    """.cpu() of a device tensor is a copy in host memory (here the tensor already is a CPU one: copy it)."""
    if torch.compiler.is_compiling() or self.numel() == 0 or self.untyped_storage().data_ptr() not in _on_npu:
        return _tensor_cpu(self, *args, **kwargs)
    return _host(self.clone())


torch.Tensor.cpu = _cpu


def _reset_peak(device=None) -> None:
    _stats["peak"] = _stats["current"]


def _mem_get_info(device=None):
    if os.environ.get("SIM_NPU_HBM_BYTES"):
        total = int(os.environ["SIM_NPU_HBM_BYTES"])
        return total - _stats["current"], total
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return free, total


npu.is_available = _is_available
npu.device_count = _device_count
npu.set_device = _set_device
npu.current_device = lambda: _current[0]
npu.synchronize = lambda device=None: None
npu.mem_get_info = _mem_get_info
npu.empty_cache = lambda: None
npu.reset_peak_memory_stats = _reset_peak
npu.memory_allocated = npu.memory_reserved = lambda device=None: _stats["current"]
npu.max_memory_allocated = lambda device=None: _stats["peak"]
npu.set_compile_mode = lambda jit_compile=False: None
npu.manual_seed = npu.manual_seed_all = lambda seed: None    # CPU tensors follow torch.manual_seed
npu._is_in_bad_fork = lambda: False
sys.modules["torch_npu.npu"] = npu

# torch's own hooks for a device type implemented in Python ("npu" has no kernels of its own here)
from torch.utils.backend_registration import _DummyPrivateUse1Hook, _setup_privateuseone_for_python_backend  # noqa


class _NoRuntime(_DummyPrivateUse1Hook):
    """No device runtime behind "npu": torch's own accelerator queries (streams, barrier devices) see the CPU."""

    def is_available(self) -> bool:
        return False


_setup_privateuseone_for_python_backend(rename="npu", backend_module=npu, hook=_NoRuntime())
torch.Tensor.npu = lambda self, device=None, non_blocking=False: self.to("npu")

# "npu" memory is CPU memory: the two allocation kernels every factory, .to("npu") and copy go through
_aten = torch.library.Library("aten", "IMPL", "PrivateUse1")
_aten.impl("empty.memory_format", lambda size, dtype=None, layout=None, device=None, pin_memory=None,
           memory_format=None: _allocated(torch.empty(size, dtype=dtype, layout=layout, device="cpu",
                                                      memory_format=memory_format)))
_aten.impl("empty_strided", lambda size, stride, dtype=None, layout=None, device=None, pin_memory=None:
           _allocated(torch.empty_strided(size, stride, dtype=dtype, layout=layout, device="cpu")))


# -- "hccl": gloo underneath -------------------------------------------------------------------
def _hccl(store, rank, size, timeout=datetime.timedelta(minutes=30)):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


if "hccl" not in dist.Backend.backend_list:
    dist.Backend.register_backend("hccl", _hccl, devices=["cpu"])


# An HCCL group takes NPU tensors only: torch_npu/csrc/distributed/ProcessGroupHCCL.cpp (Ascend/pytorch source,
# the checks every collective runs on its tensors):
# TORCH_CHECK(false, "Tensors must be NPU and dense") for a tensor that is not on the NPU. Gloo would take a
# CPU tensor, so the collectives the product calls check first, when the group is an "hccl" one, that no
# tensor is known host memory (on_host above). (Inside a torch.compile trace the tensors are fake ones.)
def _npu_only(collective):
    def checked(*args, **kwargs):
        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        if not torch.compiler.is_compiling() and dist.get_backend(group) == "hccl":
            for t in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and on_host(t):
                    raise RuntimeError(f"{collective.__name__}: Tensors must be NPU and dense (an HCCL group got a "
                                       f"CPU tensor of shape {list(t.shape)})")
        return collective(*args, **kwargs)
    checked.__name__ = checked.__qualname__ = collective.__name__
    checked._npu_checked = True
    return checked


def _npu_only_p2p(batch_isend_irecv):
    def checked(p2p_op_list):
        for op in p2p_op_list:
            if not torch.compiler.is_compiling() and dist.get_backend(op.group) == "hccl" and on_host(op.tensor):
                raise RuntimeError("batch_isend_irecv: Tensors must be NPU and dense (an HCCL group got a CPU "
                                   f"tensor of shape {list(op.tensor.shape)})")
        return batch_isend_irecv(p2p_op_list)
    checked.__name__ = checked.__qualname__ = "batch_isend_irecv"
    checked._npu_checked = True
    return checked


for _name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_to_all_single",
              "reduce_scatter_tensor", "send", "recv"):
    if not hasattr(getattr(dist, _name), "_npu_checked"):
        setattr(dist, _name, _npu_only(getattr(dist, _name)))
if not hasattr(dist.batch_isend_irecv, "_npu_checked"):
    dist.batch_isend_irecv = _npu_only_p2p(dist.batch_isend_irecv)


# -- quantized ops -------------------------------------------------------------------------------
# The dtype rules below are the documented ones: torch_npu's API reference (hiascend.com, PyTorch
# 6.0.0 "torch_npu.npu_dynamic_quant"; Ascend/op-plugin docs/context/torch_npu-npu_quant_matmul.md and
# torch_npu-npu_grouped_matmul.md, the ops of the torch-npu 2.13.0 / 2.14.0 wheels).
_HALF = (torch.float16, torch.bfloat16)


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None):
    """Per-token symmetric int8: scale = max|x| / 127 per row, y = round(x / scale)."""
    # npu_dynamic_quant: x FLOAT16 or BFLOAT16, more than one dimension; scale out FLOAT32
    if input.dtype not in _HALF:
        raise RuntimeError(f"npu_dynamic_quant: x must be float16 or bfloat16, got {input.dtype}")
    if input.dim() < 2:
        raise RuntimeError("npu_dynamic_quant: x must have more than one dimension")
    x = input.float()
    if smooth_scales is not None:
        x = x * smooth_scales.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    y = torch.round(x / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return y, scale


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
    """int8 x1 [m, k] @ int8 x2 [k, n], int32 accumulation, * scale [n] (* pertoken_scale [m])."""
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        raise RuntimeError("npu_quant_matmul: x1 and x2 must be int8")
    # docs/context/torch_npu-npu_quant_matmul.md (Ascend/op-plugin, read at commit 1dd24f2), constraints:
    # "传入的x1、x2、scale不能是空" (x1, x2 and scale must not be empty)
    if not (x1.numel() and x2.numel() and scale.numel()):
        raise RuntimeError(f"npu_quant_matmul: x1, x2 and scale must not be empty, got x1 {list(x1.shape)}, "
                           f"x2 {list(x2.shape)}, scale {list(scale.shape)}")
    if scale.dim() != 1 or scale.numel() not in (1, x2.shape[-1]):
        raise RuntimeError(f"npu_quant_matmul: scale must be 1-d of 1 or n={x2.shape[-1]}, got {list(scale.shape)}")
    if pertoken_scale is not None and (pertoken_scale.dim() != 1 or pertoken_scale.numel() != x1.shape[0]):
        raise RuntimeError(f"npu_quant_matmul: pertoken_scale must be 1-d of m={x1.shape[0]}")
    # npu_quant_matmul: output_dtype int8 (default), float16, bfloat16 or int32; no float32 output
    if output_dtype not in (None, torch.int8, torch.float16, torch.bfloat16, torch.int32):
        raise RuntimeError(f"npu_quant_matmul: output_dtype {output_dtype} is not supported")
    # with pertoken_scale (dynamic quantization) the output is float16 or bfloat16; a bfloat16 scale pairs with
    # bfloat16 output
    if pertoken_scale is not None and output_dtype not in _HALF:
        raise RuntimeError("npu_quant_matmul: pertoken_scale needs output_dtype float16 or bfloat16")
    if scale.dtype == torch.bfloat16 and output_dtype != torch.bfloat16:
        raise RuntimeError("npu_quant_matmul: a bfloat16 scale needs output_dtype bfloat16")
    acc = torch.matmul(x1.to(torch.int32), x2.to(torch.int32)).to(torch.float32)
    out = acc * scale.float().reshape(1, -1)
    if pertoken_scale is not None:
        out = out * pertoken_scale.float().reshape(-1, 1)
    if bias is not None:
        out = out + bias.float()
    return out.to(output_dtype or torch.int8)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, output_dtype=None, **_):
    """split_item=2, group_type=0: rows of x[0] grouped by expert (group_list: cumulative ends for
    group_list_type 0, counts for 1), each group times weight[0][e] [k, n]; int8 groups are scaled by
    scale[0][e] and per_token_scale[0] like npu_quant_matmul."""
    if split_item != 2 or group_type != 0 or len(x) != 1 or len(weight) != 1:
        raise RuntimeError("simulated npu_grouped_matmul supports split_item=2, group_type=0, one x, one weight")
    xs, w = x[0], weight[0]
    if w.dtype == torch.int8 and per_token_scale is not None:
        # npu_grouped_matmul, per-token (dynamic) int8: a bfloat16 scale with bfloat16 output, or a float32
        # scale with float16 output; per_token_scale float32
        pair = (scale[0].dtype, output_dtype)
        if pair not in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)):
            raise RuntimeError(f"npu_grouped_matmul: per-token int8 takes a bfloat16 scale with bfloat16 output or a "
                               f"float32 scale with float16 output, got scale {pair[0]} and output {pair[1]}")
        if per_token_scale[0].dtype != torch.float32:
            raise RuntimeError("npu_grouped_matmul: per_token_scale must be float32")
    counts = group_list.tolist() if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1)
                                                                         ).tolist()
    # docs/context/torch_npu-npu_grouped_matmul.md (Ascend/op-plugin, read at commit 07557e5):
    # group_type 0 with one x, one weight, one y: group_list is required, non-negative (non-decreasing for
    # group_list_type 0), at most 1024 groups, and its last value (type 0) or its sum (type 1) equals x's rows
    if len(counts) > 1024 or any(c < 0 for c in counts):
        raise RuntimeError("npu_grouped_matmul: group_list must be non-negative and non-decreasing, at most 1024 groups")
    if sum(counts) != xs.shape[0]:
        raise RuntimeError(f"npu_grouped_matmul: group_list covers {sum(counts)} rows, x has {xs.shape[0]} (the last "
                           "value, or the sum for group_list_type 1, must equal x's first dimension)")
    outs, start = [], 0
    for e, c in enumerate(counts):
        rows = xs[start:start + c]
        if not c:                    # an expert with no rows (npu_quant_matmul, its per-group arithmetic, takes none)
            continue
        if w.dtype == torch.int8:
            outs.append(npu_quant_matmul(rows, w[e], scale[0][e], pertoken_scale=per_token_scale[0][start:start + c],
                                         output_dtype=output_dtype))
        else:
            outs.append((rows @ w[e]).to(output_dtype or rows.dtype))
        start += c
    out = torch.cat(outs) if outs else xs.new_empty((0, w.shape[-1]), dtype=output_dtype or xs.dtype)
    return [out]


def npu_format_cast(tensor, acl_format):
    """ND (2) / FRACTAL_NZ (29) are memory layouts the NPU kernels read; on the CPU the values are the same."""
    if acl_format not in (2, 29):
        raise RuntimeError(f"unsupported acl format {acl_format}")
    return tensor


def npu_format_cast_(tensor, acl_format):
    return npu_format_cast(tensor, acl_format)
