"""TARGET, GLFC and FedWeIT on CIFAR-100, their papers' dataset: a tiny CIFAR-100 folder in the
dataset's own format (``cifar-100-python/{train,test,meta}``, Python 2 pickles of 3x32x32
uint8 rows), read through fedcl's loader from ``--data-dir``, the CNN, a real ``fedcl simulate``
run of two tasks for each method. What travels is counted for colour images of 32x32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_fedcl
from tests.test_data import _cifar_images, _write_py2_pickle
from tests.test_e2e import ray_env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.e2e

#: images of each of the 100 classes in the tiny folder
TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2


def write_tiny_cifar100(root: Path) -> None:
    """``root/cifar-100-python`` with every class present (random pixels: the runs check the
    pipeline and the traffic, not what is learned)."""
    rng = np.random.default_rng(2023)
    folder = root / "cifar-100-python"
    for name, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        fine = [c for c in range(100) for _ in range(per_class)]
        _write_py2_pickle(folder / name, {b"filenames": [b"x.png"] * len(fine),
                                          b"batch_label": name.encode(),
                                          b"fine_labels": fine,
                                          b"coarse_labels": [f // 5 for f in fine],
                                          b"data": _cifar_images(rng, len(fine))})
    _write_py2_pickle(folder / "meta", {
        b"fine_label_names": [b"class%d" % i for i in range(100)],
        b"coarse_label_names": [b"super%d" % i for i in range(20)]})


CASES = {
    # method: (scenario, its parameters for a tiny run)
    "target": ("class-il", ["synthesis_calls=2", "synthesis_batch=16"]),
    "glfc": ("class-il", ["inversion_steps=2"]),
    "fedweit": ("task-il", []),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_each_method_runs_on_cifar100_files(method: str, tmp_path: Path,
                                            ray_env: dict) -> None:  # noqa: F811
    scenario, params = CASES[method]
    write_tiny_cifar100(tmp_path / "data")
    out = tmp_path / "out"
    flags = [f for p in params for f in ("--strategy-param", p)]
    res = run_fedcl("simulate", "--strategy", method, "--scenario", scenario,
                    "--dataset", "cifar100", "--data-dir", str(tmp_path / "data"),
                    "--model", "cnn", "--clients", "2", "--tasks", "2", "--rounds-per-task", "1",
                    "--partition", "iid", "--batch-size", "16", "--round-timeout-s", "120",
                    *flags, "--output", str(out), cwd=tmp_path, env=ray_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert (s["strategy"], s["dataset"], s["scenario"]) == (method, "cifar100", scenario)
    matrix = s["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    up = s["communication"]["by_record"]["up"]
    down = s["communication"]["by_record"]["down"]
    images = 3 * 32 * 32  # one CIFAR image's uint8 bytes
    if method == "target":
        # the synthetic set travels in task 1's round: 2 calls x 16 colour images, to 2 clients
        assert down["target.synthetic"] >= 2 * 2 * 16 * images
        assert all(st.get("buffer_samples", 0) == 0 for st in s["client_state"].values())
    if method == "glfc":
        assert up["glfc.proto_grads"] > 0  # the prototype gradients, at each task's start
        stored = [st["buffer_samples"] for st in s["client_state"].values()]
        assert sum(stored) > 0  # its exemplar memory holds raw samples, and says so
        assert all(st["buffer_bytes"] >= st["buffer_samples"] * images  # raw colour images
                   for st in s["client_state"].values())
    if method == "fedweit":
        assert up.get("arrays", 0) == 0  # no dense model goes up: the sparse base does
        assert sum(v for k, v in up.items() if k.startswith("fedweit.")) > 0
