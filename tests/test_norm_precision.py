"""||V||_F feeds every patched B' = C B: it must stay exact at 7B sizes (DESIGN §1 numerics)."""

from __future__ import annotations

import torch

from safelora_cli.projector import build_projector, frobenius_norm


def test_frobenius_norm_is_float64_accurate_at_7b_mlp_size() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(11008, 4096, generator=g) * 1e-3
    exact = float(v.double().norm())
    assert abs(frobenius_norm(v) - exact) / exact < 1e-8


def test_projector_scale_matches_float64_oracle_on_a_large_weight() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4096, 2048, generator=g) * 1e-3
    p = build_projector("w", v.clone(), fan_in_fan_out=False)
    b = torch.randn(4096, 4, generator=g, dtype=torch.float64)
    v64 = v.double()
    oracle = (v64 @ (v64.T @ b)) / v64.norm()
    got = p.apply(b)
    assert float((got - oracle).norm() / oracle.norm()) < 1e-5
