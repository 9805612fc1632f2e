"""agentsd.nn.AgentAttention against a float64 reference written from the formulas, and agentify."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from agentsd.nn import AgentAttention, Attention, ViT, agentify

TOL = 1e-10


def pooled(grid, p):
    """Adaptive average pooling of a (C, h, w) grid to p × p, bin by bin."""
    C, h, w = grid.shape
    out = torch.empty(C, p, p, dtype=grid.dtype)
    for i, j in itertools.product(range(p), range(p)):
        rows = slice(math.floor(i * h / p), math.ceil((i + 1) * h / p))
        cols = slice(math.floor(j * w / p), math.ceil((j + 1) * w / p))
        out[:, i, j] = grid[:, rows, cols].mean(dim=(1, 2))
    return out.reshape(C, p * p).T  # (n, C), row-major over the p × p agents


def softmax(logits):
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def depthwise(weight, bias, grid):
    """3×3 depthwise convolution with zero padding, written as a sum over the kernel's offsets."""
    C, h, w = grid.shape
    padded = F.pad(grid, (1, 1, 1, 1))
    out = bias[:, None, None].expand(C, h, w).clone()
    for dy, dx in itertools.product(range(3), range(3)):
        out += weight[:, 0, dy, dx][:, None, None] * padded[:, dy : dy + h, dx : dx + w]
    return out


def linear_resize(t, size, dim):
    """Linear interpolation (half-pixel centres, as bilinear with align_corners=False) along one dim."""
    old = t.shape[dim]
    out = []
    for i in range(size):
        pos = min(max((i + 0.5) * old / size - 0.5, 0.0), old - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, old - 1)
        frac = pos - lo
        out.append(t.select(dim, lo) * (1 - frac) + t.select(dim, hi) * frac)
    return torch.stack(out, dim=dim)


def reference(m: AgentAttention, x, h, w, use_biases=True, use_dwc=True):
    B, N, C = x.shape
    H, n, P = m.num_heads, m.agent_num, m.num_prefix_tokens
    d = C // H
    s = d**-0.5
    qkv = x @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0)
    Q, K, V = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    outs = []
    for b in range(B):
        A = pooled(Q[b, P:].T.reshape(C, h, w), m.pool_size)  # agents from the un-scaled patch queries
        out = torch.zeros(N, C, dtype=x.dtype)
        for head in range(H):
            cols = slice(head * d, (head + 1) * d)
            q, k, v, a = Q[b, :, cols], K[b, :, cols], V[b, :, cols], A[:, cols]
            b1 = torch.zeros(n, N, dtype=x.dtype)
            b2 = torch.zeros(N, n, dtype=x.dtype)
            if use_biases:
                table1 = linear_resize(linear_resize(m.an_bias[head], h, 1), w, 2)  # (n, h, w)
                table2 = linear_resize(linear_resize(m.na_bias[head], h, 1), w, 2)
                ah = linear_resize(m.ah_bias[0, head, :, :, 0], h, 1)  # (n, h)
                aw = linear_resize(m.aw_bias[0, head, :, 0, :], w, 1)  # (n, w)
                ha = linear_resize(m.ha_bias[0, head, :, 0, :], h, 0)  # (h, n)
                wa = linear_resize(m.wa_bias[0, head, 0, :, :], w, 0)  # (w, n)
                for y, z in itertools.product(range(h), range(w)):
                    token = P + y * w + z
                    b1[:, token] = table1[:, y, z] + ah[:, y] + aw[:, z]
                    b2[token, :] = table2[:, y, z] + ha[y] + wa[z]
                for p in range(P):
                    b1[:, p] = m.ac_bias[0, head, :, p]
                    b2[p, :] = m.ca_bias[0, head, p, :]
            agent_v = softmax(a @ k.T * s + b1) @ v
            out[:, cols] = softmax(q @ a.T * s + b2) @ agent_v
        if use_dwc:
            local = depthwise(m.dwc.weight, m.dwc.bias, V[b, P:].T.reshape(C, h, w))
            out[P:] += local.reshape(C, h * w).T
        outs.append(out @ m.proj.weight.T + m.proj.bias)
    return torch.stack(outs)


def module(dim=24, heads=3, agent_num=4, grid=(4, 4), prefix=1, seed=0):
    torch.manual_seed(seed)
    m = AgentAttention(dim, heads, qkv_bias=True, agent_num=agent_num, grid_size=grid, num_prefix_tokens=prefix)
    with torch.no_grad():
        for bias in m.biases():
            bias.normal_(0, 0.5)  # large enough to matter
    return m.double().eval()


@pytest.mark.parametrize(
    "prefix, grid, agent_num",
    [(1, (4, 4), 4), (0, (4, 4), 4), (2, (6, 5), 9), (1, (7, 7), 49), (0, (3, 8), 1)],
)
def test_matches_reference(prefix, grid, agent_num):
    m = module(agent_num=agent_num, grid=grid, prefix=prefix, seed=sum(grid))
    x = torch.randn(2, prefix + grid[0] * grid[1], 24, dtype=torch.float64)
    assert (m(x, grid=grid) - reference(m, x, *grid)).abs().max() < TOL


def test_resolution_change_interpolates_the_biases():
    m = module(grid=(4, 4), agent_num=4)
    x = torch.randn(2, 1 + 6 * 7, 24, dtype=torch.float64)
    assert (m(x, grid=(6, 7)) - reference(m, x, 6, 7)).abs().max() < TOL
    square = torch.randn(1, 1 + 36, 24, dtype=torch.float64)  # a square grid is found without grid=
    assert (m(square) - reference(m, square, 6, 6)).abs().max() < TOL


def test_zero_biases_and_dwc_are_plain_agent_attention():
    m = module(agent_num=4)
    with torch.no_grad():
        for bias in m.biases():
            bias.zero_()
        m.dwc.weight.zero_()
        m.dwc.bias.zero_()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    expected = reference(m, x, 4, 4, use_biases=False, use_dwc=False)
    assert (m(x) - expected).abs().max() < TOL


def test_gradients_reach_every_parameter():
    m = module(prefix=2, grid=(4, 6), agent_num=4).train()
    x = torch.randn(2, 2 + 24, 24, dtype=torch.float64, requires_grad=True)
    m(x, grid=(4, 6)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_official_parameter_names_load_strictly():
    m = AgentAttention(192, 3, qkv_bias=True, agent_num=49, grid_size=14)  # Agent-DeiT-T's attention
    shapes = {
        "qkv.weight": (576, 192),
        "qkv.bias": (576,),
        "proj.weight": (192, 192),
        "proj.bias": (192,),
        "dwc.weight": (192, 1, 3, 3),
        "dwc.bias": (192,),
        "an_bias": (3, 49, 7, 7),
        "na_bias": (3, 49, 7, 7),
        "ah_bias": (1, 3, 49, 14, 1),
        "aw_bias": (1, 3, 49, 1, 14),
        "ha_bias": (1, 3, 14, 1, 49),
        "wa_bias": (1, 3, 1, 14, 49),
        "ac_bias": (1, 3, 49, 1),
        "ca_bias": (1, 3, 1, 49),
    }
    m.load_state_dict({k: torch.randn(v) for k, v in shapes.items()}, strict=True)
    assert m(torch.randn(1, 197, 192)).shape == (1, 197, 192)


def test_agentify_keeps_weights_and_runs():
    torch.manual_seed(0)
    vit = ViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    qkv = vit.blocks[0].attn.qkv.weight.clone()
    assert isinstance(vit.blocks[0].attn, Attention)
    agentify(vit, agent_num=4)
    attn = vit.blocks[0].attn
    assert isinstance(attn, AgentAttention) and torch.equal(attn.qkv.weight, qkv) and attn.grid_size == (4, 4)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert vit(torch.randn(1, 3, 48, 40)).shape == (1, 5)  # another resolution, non-square
    with pytest.raises(ValueError, match="no attention"):
        agentify(torch.nn.Linear(2, 2), grid_size=4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        AgentAttention(24, 3, agent_num=10)
    with pytest.raises(ValueError, match="divisible"):
        AgentAttention(25, 3)
    m = AgentAttention(24, 3, agent_num=4, grid_size=4)
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(1, 17, 24), attn_mask=torch.zeros(1, 17, 17))
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 1 + 15, 24))
