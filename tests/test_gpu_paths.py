"""The GPU-only paths, exercised on the CPU: the FA3 loader against the real `kernels` API, FlexAttention's
window against the dense mask, the allocator settings, CUDA detection through torch, MLX's device info on
older versions, MPS's host staging buffers."""

import importlib.util
import inspect
import os
import subprocess
import sys
import time

import pytest

import prepare
from autoresearch import auto_pick, hardware
from conftest import ROOT
from fake_hub import FakeHub

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


def test_a_cached_fa3_kernel_loads_from_its_folder_and_an_uncached_one_asks_the_hub(cuda_train, monkeypatch, tmp_path):
    kernels = kernels_or_skip()

    fake_kernel(tmp_path, "kernels-community/flash-attn3")  # as the harness's fetch leaves it: one build, listed
    (tmp_path / "kernels--kernels-community--flash-attn3" / "trees").mkdir()  # with the other builds it lacks
    (tmp_path / "kernels--kernels-community--flash-attn3" / "trees" / f"{KERNEL_COMMIT}.json").write_text(
        '{"format_version": 1, "files": {"README.md": {"size": 7, "blob_id": "' + "1" * 40 + '"}}}')
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = record_get_kernel(monkeypatch, kernels)
    interface, source = cuda_train.get_fa3_kernel("kernels-community/flash-attn3", 1)  # the real kernels loads it
    assert interface.WHO == "the fake kernel" and source == "local cache, offline" and calls == []
    with pytest.raises(Called):
        cuda_train.get_fa3_kernel("varunneal/flash-attention-3", 1)
    assert [args for args, _, _ in calls] == [("varunneal/flash-attention-3",)]


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
    assert auto_pick.pick_backend("auto")[0] != "cuda"
    assert auto_pick.pick_backend("cuda")[1].startswith("requested; no NVIDIA GPU")
    assert hardware.hardware_tag("cuda").startswith("cuda-cpu-")


def test_cuda_is_found_through_torch_and_honours_visible_devices(probe, tmp_path):
    # a container without nvidia-smi, a torch that sees two GPUs (a stand-in module on PYTHONPATH)
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    probe.setenv("PYTHONPATH", str(tmp_path))
    probe.setenv("PATH", os.path.dirname(sys.executable))  # python, and no nvidia-smi
    probe.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert hardware.cuda_device() == ("NVIDIA H100 80GB HBM3", 81089)
    assert hardware.hardware_tag("cuda").startswith("cuda-nvidia-h100-80gb-hbm3-80gb-torch")
    assert auto_pick.pick_backend("auto") == ("cuda", "NVIDIA GPU found (NVIDIA H100 80GB HBM3)")
    probe.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert hardware.hardware_tag("cuda").startswith("cuda-nvidia-a100-sxm4-40gb-40gb-torch")
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


@pytest.fixture
def silent_server():
    """A real TCP server on localhost that accepts connections and never answers: a network that drops packets."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


HOPPER = ("NVIDIA H100 80GB HBM3", 81559, (9, 0))
# cuda/train.py imported as on a Hopper GPU (torch here is the CPU build): its attention path and why
def as_on_hopper(root=ROOT):
    return ("import importlib.util, sys, torch\n"
            "torch.cuda.is_available = lambda: True\n"
            "torch.cuda.get_device_capability = lambda *a: (9, 0)\n"
            f"spec = importlib.util.spec_from_file_location('t', {str(root / 'backends/cuda/train.py')!r})\n"
            "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
            "print('path:', t.attention_path)\n")


AS_ON_HOPPER = as_on_hopper()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache of the user's, an H100 as the harness sees it, and hub's once-per-command answers reset."""
    from autoresearch import hub

    root = tmp_path / "hf-hub"
    root.mkdir()
    monkeypatch.delenv("KERNELS_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hardware, "cuda_properties", lambda: HOPPER)
    monkeypatch.setattr(hardware, "cuda_device", lambda: HOPPER[:2])
    hub.probe.cache_clear()
    hub.fetch.cache_clear()
    yield root
    hub.probe.cache_clear()
    hub.fetch.cache_clear()


KERNEL_COMMIT = "c0ffee" * 6 + "0123"
META = ('{"name": "flash-attn3", "id": "flash_attn3", "version": 1, "license": "Apache-2.0", "python-depends": [], '
        '"backend": {"type": "cpu"}}')
# A kernel repository as the hub holds it: a torch-cpu build (the torch here) whose module says it is the fake, and
# a build for another machine, which no fetch should bring
KERNEL_FILES = {"build/torch-cpu/metadata.json": META.encode(),
                "build/torch-cpu/flash_attn3/__init__.py": b"WHO = 'the fake kernel'\n",
                "build/torch29-cxx11-cu128-aarch64-linux/metadata.json": META.encode(), "README.md": b"a fake\n"}


def fake_kernel(root, repo, version=1):
    """The kernel's torch-cpu build in the hub cache at root, as `kernels` finds it offline (refs/v<version>)."""
    folder = root / f"kernels--{repo.replace('/', '--')}"
    for path, data in KERNEL_FILES.items():
        if path.startswith("build/torch-cpu/"):
            (folder / "snapshots" / KERNEL_COMMIT / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / "snapshots" / KERNEL_COMMIT / path).write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / f"v{version}").write_text(KERNEL_COMMIT)
    return folder


def test_a_hub_that_never_answers_sends_every_child_offline_and_the_import_does_not_hang(silent_server, monkeypatch,
                                                                                        hub_cache):
    kernels_or_skip()
    from autoresearch import hub

    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    monkeypatch.setattr(hub, "PROBE_SECONDS", 0.5)
    env, note = hub.child_env(hardware.gpu_capability("cuda"))
    assert env == {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "KERNELS_CACHE": str(hub_cache)}
    assert note.startswith(f"hub: {silent_server} did not answer in 0.5s (") and note.endswith(
        f"{hub_cache} holds no varunneal/flash-attention-3 v1 or kernels-community/flash-attn3 v1: cuda runs use "
        "PyTorch's attention"), note
    assert hub.child_env(hardware.gpu_capability("mlx")) == ({}, None)
    assert hub.child_env(hardware.gpu_capability("cuda"))[1] == note
    assert hub.probe.cache_info().misses == 1 and hub.fetch.cache_info().misses == 1  # asked once per command
    assert hardware.software_tag("cuda").endswith("-flex")  # what the children can load, not what the GPU allows
    done = subprocess.run([sys.executable, "-c", AS_ON_HOPPER], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "path: flex" in done.stdout and "fa3: varunneal/flash-attention-3 v1 unavailable (" in done.stdout


@pytest.mark.parametrize("inside_checkout", (False, True))  # True: under a folder the sandbox binds anyway
def test_fa3_fetched_ahead_loads_in_the_sandbox_offline_and_the_child_sees_nothing_else_of_the_hub_cache(
        hub_cache, use_cache, monkeypatch, tmp_path, inside_checkout):
    kernels_or_skip()
    from autoresearch import hub, runner, sandbox
    from conftest import make_checkout

    box = sandbox.resolve("require")
    root = make_checkout(tmp_path / "project", backends=("cuda",)) if inside_checkout else ROOT
    if inside_checkout:
        hub_cache = root / "hf-hub"
        hub_cache.mkdir()
        monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    private = hub_cache / "models--someone--pretrained-gpt" / "weights.txt"  # the user's own downloads
    private.parent.mkdir()
    private.write_text("weights nobody's trainer may read")
    # the hub has only the second of the two builds for Hopper: the first is missing, the second fetched
    served = FakeHub({"kernels-community/flash-attn3": ("v1", KERNEL_COMMIT, KERNEL_FILES)})
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    try:
        assert hardware.software_tag("cuda").endswith(f"-fa3-kernels{hardware.package_version('kernels')}")
    finally:
        served.close()
    assert hub.fetch((9, 0)) == (True, None) and hub.fetch.cache_info().misses == 1  # once per command
    fetched = [r for r in served.seen if "/resolve/" in r and r.startswith("GET")]
    assert len(fetched) == 2 and all("/build/torch-cpu/" in r for r in fetched), served.seen  # this build only
    env, notes = runner.train_env("cuda")
    env["AUTORESEARCH_CACHE"] = str(prepare.trainer_view())
    assert notes == [] and env["HF_HUB_OFFLINE"] == "1"
    kernel = hub_cache / "kernels--kernels-community--flash-attn3"
    script = as_on_hopper(root) + (
        "print('module:', t.fa3.WHO)\n"
        "import pathlib\n"
        f"for p in ({str(private)!r}, {str(kernel / 'refs' / 'v1')!r}):\n"
        "    try: pathlib.Path(p).read_text(); print('read', p)\n"
        "    except OSError as e: print('not read', p, e.errno)\n"
        f"try: open({str(kernel / 'planted')!r}, 'w'); print('wrote')\n"
        "except OSError as e: print('not written', e.errno)\n")
    argv, inside = box.wrap([sys.executable, "-c", script], root, runner.trainer_policy(root, env))
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(env, **inside), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert "fa3: kernels-community/flash-attn3 v1 (local cache, offline)" in out and "path: fa3" in out, out
    assert "module: the fake kernel" in out
    assert f"read {kernel / 'refs' / 'v1'}" in out and f"not read {private} 2" in out, out  # ENOENT: not there
    assert "not written 30" in out and not (kernel / "planted").exists()  # EROFS


def test_the_cache_that_lacks_fa3_is_said_once_and_the_tag_follows_it(hub_cache, monkeypatch):
    from autoresearch import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's choice: nothing is fetched
    ready, note = hub.fetch((9, 0))
    assert not ready and note.startswith("hub: HF_HUB_OFFLINE is set and ") and hub.probe.cache_info().misses == 0
    assert hardware.software_tag("cuda").endswith("-flex")
    assert hub.fetch((7, 5)) == (False, None) and hub.child_env((7, 5))[1] is None  # no FA3 build for Turing
    hub.fetch.cache_clear()
    fake_kernel(hub_cache, "varunneal/flash-attention-3")  # upstream's Hopper build only
    assert hub.fetch((9, 0)) == (True, None) and hub.fetch((8, 0))[0] is False
    assert hub.readable(hub.child_env((9, 0))[0]) == (str(hub_cache / "kernels--varunneal--flash-attention-3"),)


def test_a_fetch_that_fails_is_one_line_and_leaves_the_cache_as_it_was(hub_cache, monkeypatch):
    kernels_or_skip()
    import http.server
    import threading

    from autoresearch import hub

    class NoSuchRepository(http.server.BaseHTTPRequestHandler):  # a hub that answers, and has nothing
        def do_GET(self):
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepository)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # kernels 0.17's header with it on fails before any request
    try:
        ready, note = hub.fetch((9, 0))
    finally:
        server.shutdown()
    assert not ready and note.startswith("hub: fetching FA3 failed (varunneal/flash-attention-3 v1: "), note
    assert "; kernels-community/flash-attn3 v1: " in note and "\n" not in note
    assert note.count("404") == 2 and "Illegal header" not in note, note  # each reached the hub, which had none
    assert note.endswith("cuda runs use PyTorch's attention") and not any(
        (hub_cache / f"kernels--{r.replace('/', '--')}" / "refs").exists() for r, _, _ in prepare.FA3_KERNELS)


def test_kernels_is_pinned_to_the_checked_minor_version():
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = [Requirement(r) for group in ("cuda", "dev") for r in extras[group] if r.startswith("kernels")]
    assert len(pins) == 2 and all(str(p.specifier) in ("<0.18,>=0.17", ">=0.17,<0.18") for p in pins)
    kernels_or_skip()
    assert all(p.specifier.contains(version("kernels")) for p in pins)  # what the tests here check against


def test_the_tag_names_the_attention_path_and_versions():
    assert hardware.expected_attention((9, 0), "0.17.2", True) == "fa3-kernels0.17.2"
    assert hardware.expected_attention((9, 0), "0.17.2", False) == "flex"  # offline, nothing cached
    assert hardware.expected_attention((9, 0), None, True) == "flex"
    assert hardware.expected_attention((10, 0), "0.17.2", True) == "flex"  # no hub build for Blackwell
    assert hardware.expected_attention((7, 5), "0.17.2", True) == "sdpa"
    assert hardware.software_tag("mps") == f"torch{torch.__version__}"


IOREG = """+-o AGXAcceleratorG15X  <class AGXAcceleratorG15X, id 0x100000425, registered, matched, active>
    {
      "IOClass" = "AGXAcceleratorG15X"
      "gpu-core-count" = 40
      "model" = "Apple M3 Max"
    }"""
SYSTEM_PROFILER = """Graphics/Displays:

    Apple M1:

      Chipset Model: Apple M1
      Type: GPU
      Bus: Built-In
      Total Number of Cores: 8
      Vendor: Apple (0x106b)"""


def test_apple_gpu_core_count_from_recorded_readings(monkeypatch):
    assert hardware.apple_gpu_cores(IOREG) == 40
    assert hardware.apple_gpu_cores(SYSTEM_PROFILER) == 8
    assert hardware.apple_gpu_cores("") is None
    monkeypatch.setattr(hardware, "is_apple_silicon", lambda: True)
    monkeypatch.setattr(hardware, "cpu_name", lambda: "Apple M3 Max")
    monkeypatch.setattr(hardware, "apple_gpu_cores", lambda output=None: 40)
    assert hardware.hardware_tag("mps").startswith("mps-apple-m3-max-40gpu-")


@pytest.mark.parametrize("chip,native", [("Apple M1", False), ("Apple M1 Max", False), ("applegpu_g13s", False),
                                         ("Apple M2", True), ("Apple M3 Pro", True), ("Apple M10", True),
                                         ("applegpu_g15p", True)])
def test_bf16_only_where_the_apple_gpu_has_it_natively(chip, native):
    assert load_train("mps").native_bf16(chip) is native
    mlx_train = pytest.importorskip("mlx.core") and load_train("mlx")
    assert mlx_train.native_bf16(chip) is native


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.5e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H800 PCIe", 756e12), ("NVIDIA H800", 989.5e12),
    ("NVIDIA GH200 480GB", 989.5e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA A10G", 70e12), ("Apple M3 Max", None), ("cpu", None)])
def test_one_peak_flops_table_exact_names_first(name, peak):
    import prepare

    assert prepare.gpu_peak_flops(name) == peak
    for backend in ("cuda", "mps", "mlx"):  # no copy of the table left in a train.py
        assert "989.5e12" not in (ROOT / "backends" / backend / "train.py").read_text()


def test_graph_breaks_and_recompiles_are_counted(cuda_train):
    before = cuda_train.compile_counts()

    def breaks(x):
        y = x * 2
        torch._dynamo.graph_break()  # what an FA3 build dynamo cannot trace does to the step
        return y + 1

    compiled = torch.compile(breaks, dynamic=False, backend="eager")  # dynamo counts; no inductor needed
    for n in (3, 4):
        compiled(torch.ones(n))
    recompiles, graph_breaks = cuda_train.compile_counts()
    assert graph_breaks - before[1] == 2  # once per shape compiled
    assert recompiles - before[0] == 2  # the function and the piece after the break, again for the second shape


def test_the_evaluator_never_imports_train_py(tmp_path, use_cache, monkeypatch):
    """train.py's import may touch the GPU (and is the agent's code): the evaluator scores the exported graph with
    the harness's code alone, so code that runs when train.py is imported never runs there."""
    from autoresearch import sandbox
    from autoresearch.evaluate import evaluate
    from conftest import TINY, make_checkout

    # unconfined, so that the marker would land where the test looks, had the import run
    monkeypatch.setattr(sandbox, "_active", [sandbox.resolve("off")])
    marker = tmp_path / "imported"
    root = make_checkout(tmp_path / "project", backends=("mps",), **TINY)
    path = root / "backends" / "mps" / "train.py"
    hook = (f"import contextlib\nprint('train.py imported', file=sys.stderr)\nopen({str(marker)!r}, 'w').close()\n")
    path.write_text(path.read_text().replace("import contextlib\n", hook, 1))
    mps = load_train("mps")  # the harness's own train.py: the checkpoint's model, exported as train.py exports it
    profile = prepare.load_profile()
    model = mps.GPT(mps.GPTConfig(sequence_len=profile.seq_len, vocab_size=profile.vocab_size, n_layer=2, n_head=2,
                                  n_kv_head=2, n_embd=64, window_pattern="SL"))
    model.init_weights()
    checkpoint = prepare.export_model(model, 8, profile.seq_len, mps.autocast_ctx())(tmp_path / "checkpoint")
    result = evaluate("mps", root, checkpoint, timeout=300)
    assert result.status == "ok", result.log
    assert not marker.exists() and "train.py imported" not in result.log, result.log


def test_a_hub_that_answers_the_probe_then_stalls_is_given_up_and_said_in_one_line(hub_cache, monkeypatch):
    kernels_or_skip()
    import socket
    import threading

    from autoresearch import hub

    server, held = socket.socket(), []
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve():  # the probe gets its answer; every other request, nothing, ever
        while True:
            try:
                conn = server.accept()[0]
            except OSError:
                return
            held.append(conn)
            if conn.recv(65536).startswith(b"HEAD /api/models"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hub, "STALL_SECONDS", 3.0)  # huggingface_hub's own retries waited over 13 minutes here
    try:
        ready, note = hub.fetch((9, 0))
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert not ready and note.startswith("hub: fetching FA3 failed (varunneal/flash-attention-3 v1: nothing arrived "
                                         "for 3s) and "), note  # the second build is not tried against a stalled hub


class PathInEtag(FakeHub):
    """A hub (HF_ENDPOINT, a mirror, a proxy) whose files come with an ETag that is a path: huggingface_hub 2.4 names
    the blob it writes by it, unchecked."""

    def __init__(self, repos, etag):
        self.etag = etag
        super().__init__(repos)

    def answer(self, path, query):
        status, body, headers = super().answer(path, query)
        return status, body, dict(headers, ETag=f'"{self.etag}"') if "/resolve/" in path and status == 200 else headers


@pytest.mark.parametrize("relative", (True, False))
def test_a_hostile_hub_writes_nothing_outside_the_hub_cache(hub_cache, monkeypatch, tmp_path, relative):
    kernels_or_skip()
    from autoresearch import hub, sandbox

    sandbox.resolve("require")
    outside = tmp_path / "outside" / "planted"  # stands for ~/.bashrc, a .pth file in site-packages
    outside.parent.mkdir()
    blobs = hub_cache / "kernels--kernels-community--flash-attn3" / "blobs"
    served = PathInEtag({"kernels-community/flash-attn3": ("v1", KERNEL_COMMIT, KERNEL_FILES)},
                        os.path.relpath(outside, blobs) if relative else str(outside))
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    try:
        hub.download("kernels-community/flash-attn3", 1, hub_cache, time.time() + 120)
    finally:
        served.close()
    assert not outside.exists() and list(outside.parent.iterdir()) == []


def test_a_hub_that_trickles_its_answer_to_the_probe_is_no_answer(hub_cache):
    import socket
    import threading

    from autoresearch import hub

    server, stop = socket.socket(), threading.Event()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def trickle():  # a header that never ends, a byte well inside each read's timeout
        conn = server.accept()[0]
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not stop.wait(0.2):
            conn.sendall(b"a")
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        assert hub.probe(f"http://127.0.0.1:{server.getsockname()[1]}", 1.0) == "no whole answer within 1s"
    finally:
        stop.set()
        server.close()


def test_a_relative_or_unusable_hub_cache_is_made_absolute_or_said(hub_cache, monkeypatch, tmp_path):
    from autoresearch import hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", "hf")  # relative: the cover and the binds must still name it
    assert hub.cache_root() == tmp_path / "hf"
    assert hub.hidden(hub.child_env((7, 5))[0]) == (str(tmp_path / "hf"),)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a-file" / "hub"))  # cannot be made: a note, no exception
    error = hub.download("kernels-community/flash-attn3", 1, hub.cache_root(), time.time() + 60)
    assert error.startswith(("NotADirectoryError", "FileExistsError")), error
