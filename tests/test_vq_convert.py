"""STAR-VQ weights: a PyTorch forward written from STAR_SPEC section 2 agrees with the Flax model;
import -> export is bit-exact; STAR (`pixel_encoder.`) layout; clear errors; no pickles."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from star_jax.convert import tensor_io, vq_io, vq_table
from star_jax.convert.table import CheckpointError
from star_jax.models import vq

CFG = vq.VQConfig.from_size("tiny")


# ---------------------------------------------------------------------------------------------
# PyTorch reference, written from the spec (LlamaGen VQGAN layout, multi-head attention).


def _norm(c):
    return nn.GroupNorm(CFG.norm_groups, c, eps=1e-6, affine=True)


class TRes(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class TAttn(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.norm, self.heads = _norm(c), heads
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        d = c // self.heads
        split = lambda t: t.reshape(b, self.heads, d, h * w).transpose(2, 3)  # [b, heads, hw, d]
        q, k, v = split(self.q(hn)), split(self.k(hn)), split(self.v(hn))
        p = torch.softmax(q @ k.transpose(2, 3) * d**-0.5, dim=-1)
        out = (p @ v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class TDown(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class TUp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TLevel(nn.Module):
    def __init__(self, cin, cout, n, attn, resample):
        super().__init__()
        self.res = nn.ModuleList([TRes(cin if j == 0 else cout, cout) for j in range(n)])
        self.attn = nn.ModuleList([TAttn(cout, CFG.attn_heads) for _ in range(n)] if attn else [])
        if resample == "down":
            self.downsample = TDown(cout)
        if resample == "up":
            self.upsample = TUp(cout)

    def forward(self, x):
        for j, r in enumerate(self.res):
            x = r(x)
            if len(self.attn):
                x = self.attn[j](x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class TEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        chans, c = [CFG.ch * m for m in CFG.ch_mult], CFG.ch
        self.conv_in = nn.Conv2d(3, CFG.ch, 3, 1, 1)
        levels = []
        for i, out in enumerate(chans):
            last = i == len(chans) - 1
            levels.append(TLevel(c, out, CFG.num_res_blocks, last, None if last else "down"))
            c = out
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = nn.ModuleList([TRes(c, c), TAttn(c, CFG.attn_heads), TRes(c, c)])
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, CFG.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for m in list(self.conv_blocks) + list(self.mid):
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [CFG.ch * m for m in CFG.ch_mult][::-1]
        c = chans[0]
        self.conv_in = nn.Conv2d(CFG.z_channels, c, 3, 1, 1)
        self.mid = nn.ModuleList([TRes(c, c), TAttn(c, CFG.attn_heads), TRes(c, c)])
        levels = []
        for i, out in enumerate(chans):
            last = i == len(chans) - 1
            levels.append(TLevel(c, out, CFG.num_res_blocks + 1, i == 0, None if last else "up"))
            c = out
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in list(self.mid) + list(self.conv_blocks):
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TQuantizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(CFG.codebook_size, CFG.codebook_dim)
        self.register_buffer("codebook_used", torch.arange(CFG.usage_window_size, dtype=torch.float32) % 7)


class TVQ(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder, self.quantize = TEncoder(), TDecoder(), TQuantizer()
        self.quant_conv = nn.Conv2d(CFG.z_channels, CFG.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(CFG.codebook_dim, CFG.z_channels, 1)

    def encode(self, x):  # -> pre-quantisation z, nearest codes
        h = self.quant_conv(self.encoder(x)).permute(0, 2, 3, 1)
        flat = h.reshape(-1, CFG.codebook_dim)
        e = self.quantize.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.T
        return h, d.argmin(1).reshape(h.shape[:3])

    def decode(self, z_q):  # z_q [B, h, w, D]
        return self.decoder(self.post_quant_conv(z_q.permute(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    model = TVQ().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial GroupNorm affine params
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("vq") / "vq.safetensors")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    tensor_io.save_safetensors(path, state)
    return model, path, state


def test_reference_names_are_the_mapping(reference):
    _, _, state = reference
    model = vq_io.load_vq(reference[1], CFG)
    from flax import nnx

    ours = vq_table.to_reference(nnx.state(model))
    assert sorted(ours) == sorted(state)
    assert "encoder.conv_blocks.1.downsample.conv.weight" in ours
    # the decoder has num_res_blocks + 1 blocks (with attention) at its first, lowest level
    assert f"decoder.conv_blocks.0.attn.{CFG.num_res_blocks}.proj_out.weight" in ours
    assert "decoder.conv_blocks.1.attn.0.q.weight" not in ours
    assert "decoder.conv_blocks.1.upsample.conv.bias" in ours and "encoder.mid.1.q.weight" in ours


def test_torch_parity_encoder_decoder(reference):
    torch_model, path, _ = reference
    model = vq_io.load_vq(path, CFG)
    x = np.random.RandomState(0).uniform(-1, 1, (2, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        h_ref, idx_ref = torch_model.encode(torch.from_numpy(x).permute(0, 3, 1, 2))
    z_q = np.random.RandomState(1).normal(size=(2, CFG.grid_size, CFG.grid_size, CFG.codebook_dim))
    z_q = z_q.astype(np.float32)
    codes = idx_ref.numpy()
    with torch.no_grad():
        img_ref = torch_model.decode(torch.from_numpy(z_q)).permute(0, 2, 3, 1).numpy()
        emb = torch_model.quantize.embedding.weight[torch.from_numpy(codes)]
        img_codes_ref = torch_model.decode(emb).permute(0, 2, 3, 1).numpy()

    @nnx.jit
    def run(m, x, z_q, codes):  # one compiled program for every output
        return m.encode_continuous(x), m.encode_to_codes(x), m.decode(z_q), m.decode_codes(codes)

    h, idx, img, img_codes = run(model, jnp.asarray(x), jnp.asarray(z_q), jnp.asarray(codes))
    assert h.shape == (2, CFG.grid_size, CFG.grid_size, CFG.codebook_dim)
    np.testing.assert_allclose(np.asarray(h), h_ref.numpy(), atol=1e-4, rtol=0)
    assert np.mean(np.asarray(idx) == codes) >= 0.99  # ties within fp rounding may differ, nothing more
    assert img.shape == (2, CFG.image_size, CFG.image_size, 3)
    np.testing.assert_allclose(np.asarray(img), img_ref, atol=1e-4, rtol=0)
    # decode_codes looks codes up in the imported codebook
    np.testing.assert_allclose(np.asarray(img_codes), img_codes_ref, atol=1e-4, rtol=0)


def test_import_export_bit_exact(reference, tmp_path):
    _, path, state = reference
    # sizes read off the shapes; heads and groups are not in a state dict
    model = vq_io.load_vq(path, attn_heads=CFG.attn_heads, norm_groups=CFG.norm_groups)
    assert model.cfg.ch_mult == CFG.ch_mult and model.cfg.usage_window_size == CFG.usage_window_size
    out = str(tmp_path / "out.safetensors")
    vq_io.save_vq(model, out)
    back = tensor_io.SafetensorsFile(out)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        got = np.asarray(back[name])
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert np.array_equal(got.view(np.uint32), value.view(np.uint32)), name


def test_star_prefixed_and_pt(reference, tmp_path):
    torch_model, _, state = reference
    star = {f"pixel_encoder.{k}": v for k, v in state.items()}
    star["llm.model.norm.weight"] = np.ones(4, np.float32)  # other STAR parts are ignored
    pt = str(tmp_path / "star.pt")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in star.items()}}, pt)
    model = vq_io.load_vq(pt, attn_heads=CFG.attn_heads, norm_groups=CFG.norm_groups, image_size=32)
    assert model.cfg == CFG
    out = str(tmp_path / "star.safetensors")
    vq_io.save_vq(model, out, prefix="pixel_encoder.")
    back = tensor_io.SafetensorsFile(out)
    assert sorted(back) == sorted(k for k in star if k.startswith("pixel_encoder."))
    assert all(np.array_equal(np.asarray(back[k]), star[k]) for k in back)
    vq_io.save_vq(model, str(tmp_path / "vq.pt"))  # a .pt of plain tensors, read via weights_only
    again = tensor_io.read_tensors(str(tmp_path / "vq.pt"))
    assert sorted(again) == sorted(state) and all(np.array_equal(again[k], state[k]) for k in state)


def test_missing_usage_buffer_is_optional(reference, tmp_path):
    _, _, state = reference
    path = str(tmp_path / "nobuf.safetensors")
    tensor_io.save_safetensors(path, {k: v for k, v in state.items() if k != "quantize.codebook_used"})
    model = vq_io.load_vq(path, CFG)
    assert np.all(np.asarray(model.quantize.codebook_used[...]) == -1)


def test_mismatch_lists_missing_unexpected_misshaped(reference, tmp_path):
    _, _, state = reference
    bad = dict(state)
    del bad["encoder.conv_in.weight"]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    bad["decoder.norm_out.bias"] = np.zeros(5, np.float32)
    path = str(tmp_path / "bad.safetensors")
    tensor_io.save_safetensors(path, bad)
    with pytest.raises(CheckpointError) as e:
        vq_io.load_vq(path, CFG)
    msg = str(e.value)
    assert "missing (1): encoder.conv_in.weight" in msg
    assert "unexpected (1): encoder.extra.weight" in msg
    assert "decoder.norm_out.bias: expected (16,), found (5,)" in msg


def test_refuses_pickles_and_unknown(tmp_path):
    for name in ("w.bin", "w.ckpt", "w.npz"):
        p = str(tmp_path / name)
        open(p, "wb").write(b"\x80\x04junk")
        with pytest.raises(CheckpointError, match=name):
            tensor_io.read_tensors(p)
    with pytest.raises(CheckpointError, match="no such weights file"):
        tensor_io.read_tensors(str(tmp_path / "none.safetensors"))
    with pytest.raises(CheckpointError, match="no VQ tensors"):
        p = str(tmp_path / "other.safetensors")
        tensor_io.save_safetensors(p, {"x.weight": np.zeros(2, np.float32)})
        vq_io.load_vq(p)


def test_mapping_table_rejects_unknown_leaf():
    assert vq_table.ref_name("encoder/mid/1/q/kernel")[0] == "encoder.mid.1.q.weight"
    assert vq_table.ref_name("quantize/embedding", "pixel_encoder.")[0] == "pixel_encoder.quantize.embedding.weight"
    with pytest.raises(KeyError, match="VQ_TABLE"):
        vq_table.ref_name("encoder/conv_in/weird")


def test_bf16_checkpoint_imports(reference, tmp_path):
    import ml_dtypes

    _, _, state = reference
    path = str(tmp_path / "bf16.safetensors")
    tensor_io.save_safetensors(path, {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()})
    model = vq_io.load_vq(path, CFG)
    w = np.asarray(model.encoder.conv_in.kernel[...])
    assert w.dtype == np.float32
    want = np.transpose(state["encoder.conv_in.weight"].astype(ml_dtypes.bfloat16).astype(np.float32), (2, 3, 1, 0))
    assert np.array_equal(w, want)
    assert os.path.getsize(path) < sum(v.nbytes for v in state.values())


def test_cli_encode_decode(reference, tmp_path):
    from PIL import Image

    from star_jax.cli import vq as cli

    _, path, _ = reference
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in ("a.png", "sub/b.jpg"):
        Image.fromarray(rng.randint(0, 255, (40, 48, 3), np.uint8)).save(images / name)
    codes_file = str(tmp_path / "codes.arrayrecord")
    flags = ["--weights", path, "--size", "tiny", "--batch_size", "2"]
    assert cli.main(["star-jax vq", "encode", "--images", str(images), "--out", codes_file, *flags]) == 0
    records = cli.read_codes(codes_file)
    assert [n for n, _ in records] == ["a", "sub/b"]
    x = np.stack([cli.load_image(str(images / n), 32) for n in ("a.png", "sub/b.jpg")])
    with torch.no_grad():
        _, want = reference[0].encode(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert all(c.dtype == np.int32 and c.shape == (8, 8) for _, c in records)
    assert np.mean(np.stack([c for _, c in records]) == want.numpy()) >= 0.99
    out = tmp_path / "decoded"
    assert cli.main(["star-jax vq", "decode", "--codes", codes_file, "--out", str(out), *flags]) == 0
    decoded = np.asarray(Image.open(out / "sub" / "b.png"))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
    assert cli.main(["star-jax vq", "decode", "--codes", str(tmp_path / "none"), "--out", str(out), *flags]) == 2
    assert cli.decode_record(cli.encode_record("x", np.arange(6).reshape(2, 3)))[1].tolist() == [[0, 1, 2], [3, 4, 5]]
