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

import torch
import torch.distributed as dist

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


def _mem_get_info(device=None):
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
# the CPU has no allocator statistics: torch holds nothing "on the device", all used memory is outside it
npu.reset_peak_memory_stats = lambda device=None: None
npu.memory_allocated = npu.max_memory_allocated = npu.memory_reserved = lambda device=None: 0
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
           memory_format=None: torch.empty(size, dtype=dtype, layout=layout, device="cpu", memory_format=memory_format))
_aten.impl("empty_strided", lambda size, stride, dtype=None, layout=None, device=None, pin_memory=None:
           torch.empty_strided(size, stride, dtype=dtype, layout=layout, device="cpu"))


# -- "hccl": gloo underneath -------------------------------------------------------------------
def _hccl(store, rank, size, timeout=datetime.timedelta(minutes=30)):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


if "hccl" not in dist.Backend.backend_list:
    dist.Backend.register_backend("hccl", _hccl, devices=["cpu"])


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
    outs, start = [], 0
    for e, c in enumerate(counts):
        rows = xs[start:start + c]
        if w.dtype == torch.int8:
            outs.append(npu_quant_matmul(rows, w[e], scale[0][e], pertoken_scale=per_token_scale[0][start:start + c],
                                         output_dtype=output_dtype))
        else:
            outs.append((rows @ w[e]).to(output_dtype or rows.dtype))
        start += c
    out = torch.cat(outs) if outs else xs.new_empty((0, w.shape[-1]), dtype=output_dtype or xs.dtype)
    if start < xs.shape[0]:  # rows past the last group are left untouched (zeros here)
        out = torch.cat([out, out.new_zeros((xs.shape[0] - start, w.shape[-1]))])
    return [out]


def npu_format_cast(tensor, acl_format):
    """ND (2) / FRACTAL_NZ (29) are memory layouts the NPU kernels read; on the CPU the values are the same."""
    if acl_format not in (2, 29):
        raise RuntimeError(f"unsupported acl format {acl_format}")
    return tensor


def npu_format_cast_(tensor, acl_format):
    return npu_format_cast(tensor, acl_format)
