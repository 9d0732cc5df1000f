"""Why int8 does not pay at batch 1: what one oneDNN convolution call costs, fp32 and int8.

A frozen Inductor graph calls one extern oneDNN op per convolution: fp32
``mkldnn._convolution_pointwise`` with a prepacked weight, int8 ``onednn.qconv_pointwise``
with a prepacked int8 weight (uint8 activations, per-channel scales). This times both ops
alone at batch 1, 3x3 kernels, over channel counts and image sides spanning 100x in
multiply-accumulates, in this one process, 1 thread (median of ``--repeats`` calls after a
warm-up). A least-squares line ``time = fixed + per_mac * MACs`` per dtype splits each call
into a fixed part (dispatch, oneDNN primitive set-up, allocation) and the arithmetic; the
table shows how much of each call at the pruned default model's shapes is the fixed part.

    .venv/bin/python bench/conv_call_cost.py [--repeats 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aihpc.provenance import cpu_info  # noqa: E402

# (in channels, out channels, side): resnet_s-struct0.5's convolutions first, then wider ones.
SHAPES = [
    (8, 16, 28),
    (16, 16, 14),
    (16, 32, 14),
    (32, 32, 7),
    (32, 32, 14),
    (64, 64, 7),
    (64, 64, 14),
    (128, 128, 14),
]
PRUNED_MODEL_SHAPES = 4  # the first entries are the ones resnet_s-struct0.5 runs


def median_us(call: Callable[[], torch.Tensor], repeats: int) -> float:
    for _ in range(repeats // 10):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - started)
    return float(np.median(times)) / 1e3


def conv_calls(c_in: int, c_out: int, side: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The fp32 and int8 op calls a frozen Inductor graph makes for one 3x3 convolution."""
    pad = stride = dilation = [1, 1]
    shape = (1, c_in, side, side)
    bias = torch.rand(c_out)
    x = torch.rand(shape).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3)
    packed = torch.ops.mkldnn._reorder_convolution_weight(
        weight, pad, stride, dilation, 1, list(shape)
    )
    q_x = torch.randint(0, 256, shape, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last
    )
    q_weight = torch.randint(-127, 128, (c_out, c_in, 3, 3), dtype=torch.int8)
    w_scale, w_zero = torch.rand(c_out) * 0.01, torch.zeros(c_out, dtype=torch.int64)
    x_scale, x_zero = 0.02, 5
    q_packed = torch.ops.onednn.qconv_prepack(
        q_weight, w_scale, x_scale, x_zero, stride, pad, dilation, 1, shape
    )
    x_scale_t, x_zero_t = torch.tensor(x_scale), torch.tensor(x_zero, dtype=torch.int32)
    return {
        "fp32": lambda: torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, pad, stride, dilation, 1, "none", [], ""
        ),
        # uint8 out, as between two int8 convolutions
        "int8": lambda: torch.ops.onednn.qconv_pointwise.tensor(
            q_x, x_scale_t, x_zero_t, q_packed, w_scale, w_zero, bias, stride, pad, dilation,
            1, 0.05, 100, torch.uint8, "none", [None], "",
        ),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with torch.inference_mode():
        for c_in, c_out, side in SHAPES:
            macs = c_in * c_out * 9 * side * side
            calls = conv_calls(c_in, c_out, side)
            rows.append(
                {"shape": (c_in, c_out, side), "macs": macs}
                | {dtype: median_us(call, args.repeats) for dtype, call in calls.items()}
            )
    macs = np.array([row["macs"] for row in rows], dtype=float)
    fits = {dtype: np.polyfit(macs, [row[dtype] for row in rows], 1) for dtype in ("fp32", "int8")}
    cpu = cpu_info()
    print(
        f"CPU {cpu['model']} ({', '.join(cpu['flags'])}), 1 thread, torch {torch.__version__}; "
        f"median of {args.repeats} calls at batch 1"
    )
    print("\n| in->out channels, side | MMACs | fp32 us | int8 us | int8/fp32 |")
    print("|:--|--:|--:|--:|--:|")
    for row in rows:
        c_in, c_out, side = row["shape"]
        print(
            f"| {c_in}->{c_out}, {side}x{side} | {row['macs'] / 1e6:.2f} | {row['fp32']:.1f} | "
            f"{row['int8']:.1f} | {row['int8'] / row['fp32']:.2f} |"
        )
    print()
    pruned = rows[:PRUNED_MODEL_SHAPES]
    for dtype, (per_mac, fixed) in fits.items():
        share = np.mean([fixed / row[dtype] for row in pruned])
        print(
            f"{dtype}: fixed {fixed:.1f} us per call + {per_mac * 1e6:.2f} us per MMAC; the "
            f"fixed part is {share:.0%} of a call at resnet_s-struct0.5's shapes"
        )


if __name__ == "__main__":
    main()
