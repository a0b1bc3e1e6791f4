"""The GPU-only paths, exercised on the CPU: the FA3 loader against the real `kernels` API, FlexAttention's
window against the dense mask, the allocator settings, CUDA detection through torch, MLX's device info on
older versions, MPS's host staging buffers."""

import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

from autoresearch import hardware
from conftest import ROOT

torch = pytest.importorskip("torch")


def load_train(backend):
    """backends/<backend>/train.py imported by path: importing defines the model and trains nothing."""
    spec = importlib.util.spec_from_file_location(f"gpu_paths_{backend}_train", ROOT / "backends" / backend / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks a traced function's module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cuda_train():
    return load_train("cuda")


def kernels_or_skip():
    return pytest.importorskip("kernels", reason="kernels not installed (pip install -e '.[dev]' brings it)")


class Called(Exception):
    pass


def record_get_kernel(monkeypatch, kernels):
    """Replace kernels.get_kernel with a recorder: (args, kwargs, hub offline flag at the call) per call."""
    from huggingface_hub import constants

    calls = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs, constants.HF_HUB_OFFLINE))
        raise Called

    monkeypatch.setattr(kernels, "get_kernel", recorder)
    return calls


def test_fa3_call_is_valid_against_the_installed_kernels_api(cuda_train, monkeypatch, tmp_path):
    kernels = kernels_or_skip()
    from kernels._versions import revision_or_version
    from kernels.hf_hub import _check_trust_remote_code

    real = inspect.signature(kernels.get_kernel)
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path))  # empty: nothing cached, the hub would be asked
    calls = record_get_kernel(monkeypatch, kernels)
    for repo, version, _ in cuda_train.FA3_KERNELS:
        with pytest.raises(Called):
            cuda_train.get_fa3_kernel(repo, version)
    assert [args[0] for args, _, _ in calls] == [repo for repo, _, _ in cuda_train.FA3_KERNELS]
    for args, kwargs, offline in calls:
        real.bind(*args, **kwargs)  # every argument exists under that name
        revision_or_version(revision=kwargs.get("revision"), version=kwargs.get("version"))  # a version is pinned
        # trusted by name: returns without asking the hub (there is no network here, so asking would raise)
        _check_trust_remote_code(args[0], local_files_only=False, trust_remote_code=kwargs["trust_remote_code"])
        assert kwargs["trust_remote_code"] == [args[0]]  # exactly this repository, not every publisher
        assert not offline


def test_a_cached_fa3_kernel_loads_offline(cuda_train, monkeypatch, tmp_path):
    kernels = kernels_or_skip()
    from huggingface_hub import constants

    repo, version, _ = cuda_train.FA3_KERNELS[0]
    refs = tmp_path / f"kernels--{repo.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True)
    (refs / f"v{version}").write_text("0" * 40)
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path))
    calls = record_get_kernel(monkeypatch, kernels)
    for repo, version, _ in cuda_train.FA3_KERNELS:
        with pytest.raises(Called):
            cuda_train.get_fa3_kernel(repo, version)
    assert [offline for _, _, offline in calls] == [True, False]  # the cached one offline, the other from the hub
    assert constants.HF_HUB_OFFLINE is False  # the user's setting is back


def test_fa3_loader_runs_the_real_kernels_offline_and_says_why_it_fell_back(cuda_train, tmp_path):
    kernels_or_skip()
    script = ("import importlib.util\n"
              f"spec = importlib.util.spec_from_file_location('t', {str(ROOT / 'backends/cuda/train.py')!r})\n"
              "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
              "print('hopper:', t.load_flash_attention_3((9, 0)))\n"
              "print('blackwell:', t.load_flash_attention_3((10, 0)))\n")
    env = {k: v for k, v in os.environ.items() if k != "KERNELS_CACHE"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path), HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for repo, version, _ in cuda_train.FA3_KERNELS:
        # past the signature, the version and the trust checks, the real kernels stops at the empty cache
        assert any(line.startswith(f"fa3: {repo} v{version} unavailable (") and "not available in the local cache"
                   in line for line in lines), lines
    assert "hopper: None" in lines and "fa3: no hub build for sm100" in lines and "blackwell: None" in lines


@pytest.mark.parametrize("T,window", [(256, 128), (200, 50), (64, 3), (130, 128)])
def test_flex_window_matches_the_dense_mask(cuda_train, T, window):
    gen = torch.Generator().manual_seed(T + window)
    q, k, v = (torch.randn(2, 3, T, 16, generator=gen) for _ in range(3))  # Flex has no backward on the CPU
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=cuda_train.window_mask(T, window, q.device))
    torch.testing.assert_close(cuda_train.flex_window_attention(q, k, v, window), dense, atol=1e-5, rtol=1e-5)


def test_compiled_attention_takes_the_flex_window(cuda_train, monkeypatch):
    # the path a GPU without FA3 takes: attention() under torch.compile, the block mask built in the graph
    T, window = 256, 128
    q, k, v = (torch.randn(2, T, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = cuda_train.attention(q, k, v, window)  # eager: the dense boolean mask
    taken = []
    flex = cuda_train.flex_window_attention
    monkeypatch.setattr(cuda_train, "use_flex", True)
    monkeypatch.setattr(cuda_train, "flex_window_attention", lambda *a: taken.append(1) or flex(*a))
    compiled = torch.compile(lambda q, k, v: cuda_train.attention(q, k, v, window), dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), expected, atol=1e-5, rtol=1e-5)
    assert taken  # traced through the flex branch


@pytest.mark.parametrize("capability,dtype,compiled,path", [
    ((6, 0), "torch.float32", False, "sdpa"),  # Pascal: no bf16, too old for Triton
    ((7, 5), "torch.float32", True, "sdpa"),  # T4: no bf16; compiled in float32
    ((8, 9), "torch.bfloat16", True, "flex"),  # L4 / 4090 with no FA3 to load (offline, nothing cached)
    ((10, 0), "torch.bfloat16", True, "flex"),  # B200: no hub FA3 build
])
def test_precision_compile_and_attention_follow_the_compute_capability(tmp_path, capability, dtype, compiled, path):
    # cuda/train.py imported as on such a GPU: torch's CUDA queries answered for it (nothing runs on a device)
    script = ("import importlib.util, torch\n"
              "torch.cuda.is_available = lambda: True\n"
              f"torch.cuda.get_device_capability = lambda *a: {capability!r}\n"
              f"spec = importlib.util.spec_from_file_location('t', {str(ROOT / 'backends/cuda/train.py')!r})\n"
              "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
              "print('chose:', t.compute_dtype, t.use_compile, t.attention_path)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path), KERNELS_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"chose: {dtype} {compiled} {path}" in lines, lines
    if dtype == "torch.float32":  # the fallback says so
        assert any(line.startswith(f"precision: sm{capability[0]}{capability[1]} has no bf16") for line in lines), lines
    else:
        assert any(line.startswith("fa3: ") for line in lines), lines  # which kernel, or why none


def test_both_allocator_variables_are_set_and_a_users_choice_kept():
    script = ("import importlib.util, os\n"
              f"spec = importlib.util.spec_from_file_location('t', {str(ROOT / 'backends/cuda/train.py')!r})\n"
              "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
              "print(os.environ['PYTORCH_ALLOC_CONF'], os.environ['PYTORCH_CUDA_ALLOC_CONF'])\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("ALLOC_CONF")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["expandable_segments:True", "expandable_segments:True"], done.stderr
    env["PYTORCH_ALLOC_CONF"] = "max_split_size_mb:512"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["max_split_size_mb:512", "max_split_size_mb:512"], done.stderr


FAKE_TORCH = '''
import os, types
GPUS = [("NVIDIA H100 80GB HBM3", 85_028_765_696), ("NVIDIA A100-SXM4-40GB", 42_298_834_944)]


def _visible():  # torch numbers the devices CUDA_VISIBLE_DEVICES lists, in its order
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return GPUS if env is None else [GPUS[int(i)] for i in env.split(",") if i.strip()]


cuda = types.SimpleNamespace(
    is_available=lambda: bool(_visible()),
    get_device_properties=lambda i: types.SimpleNamespace(name=_visible()[i][0], total_memory=_visible()[i][1]),
)
'''


@pytest.fixture
def probe(monkeypatch):
    hardware._probe_cuda.cache_clear()
    yield monkeypatch
    hardware._probe_cuda.cache_clear()


def fake_nvidia_smi(directory):
    path = directory / "nvidia-smi"
    path.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559'\n")
    path.chmod(0o755)


def test_a_gpu_that_torch_cannot_use_is_not_cuda(probe, tmp_path):
    # nvidia-smi sees an H100, this torch (the CPU build here) does not: the harness must not pick cuda
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    fake_nvidia_smi(tmp_path)
    probe.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert hardware.cuda_device() is None
    assert "cuda" not in hardware.available_backends()
    assert hardware.pick_backend("auto")[0] != "cuda"
    assert hardware.pick_backend("cuda")[1].startswith("requested; no NVIDIA GPU")
    assert hardware.hardware_tag("cuda").startswith("cuda-cpu-")


def test_cuda_is_found_through_torch_and_honours_visible_devices(probe, tmp_path):
    # a container without nvidia-smi, a torch that sees two GPUs (a stand-in module on PYTHONPATH)
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    probe.setenv("PYTHONPATH", str(tmp_path))
    probe.setenv("PATH", os.path.dirname(sys.executable))  # python, and no nvidia-smi
    probe.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert hardware.cuda_device() == ("NVIDIA H100 80GB HBM3", 81089)
    assert hardware.hardware_tag("cuda") == "cuda-nvidia-h100-80gb-hbm3-80gb"
    assert hardware.pick_backend("auto") == ("cuda", "NVIDIA GPU found (NVIDIA H100 80GB HBM3)")
    probe.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert hardware.hardware_tag("cuda") == "cuda-nvidia-a100-sxm4-40gb-40gb"
    assert hardware.device_name("cuda") == "NVIDIA A100-SXM4-40GB 40GB"
    probe.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.cuda_device() is None
    assert hardware._probe_cuda.cache_info().misses == 3  # once per process and CUDA_VISIBLE_DEVICES
    probe.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert hardware.cuda_device()[0] == "NVIDIA A100-SXM4-40GB" and hardware._probe_cuda.cache_info().misses == 3


def test_mlx_device_name_before_top_level_device_info(monkeypatch):
    mx = pytest.importorskip("mlx.core")
    train = load_train("mlx")
    monkeypatch.setattr(train, "on_gpu", True)
    monkeypatch.delattr(mx, "device_info")  # MLX < 0.30.4
    monkeypatch.setattr(mx.metal, "device_info", lambda: {"architecture": "applegpu_g13s", "max_buffer_length": 1})
    assert train.device_name() == "applegpu_g13s"
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "Apple M3 Max"}, raising=False)
    assert train.device_name() == "Apple M3 Max"


def test_mps_staging_refills_the_oldest_buffer_only():
    train = load_train("mps")
    slots = [train.staging_slot((2, 3)) for _ in range(train.STAGING_SLOTS + 2)]
    first = slots[: train.STAGING_SLOTS]
    assert len({id(s[0]) for s in first}) == train.STAGING_SLOTS  # distinct buffers while copies may be in flight
    assert slots[train.STAGING_SLOTS] is first[0] and slots[train.STAGING_SLOTS + 1] is first[1]
    assert train.staging_slot((1, 3)) is not first[0]  # each batch shape has its own
    assert first[0][0].dtype == torch.long and first[0][1] is None  # int64 ids; no copy recorded yet
