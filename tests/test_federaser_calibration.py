"""FedEraser's calibrated step follows the paper: the stored update of round t is measured
from the global model round t started from (GM_t, the current one), not from the next global
model GM_{t+1} as the authors' code does."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord

from fedcl import protocol
from fedcl.config import Config
from fedcl.erasure import ErasedData
from fedcl.rounds import RoundOutcome
from fedcl.strategy import RoundInfo
from strategies.unlearning import federaser
from strategies.unlearning.federaser import CalibrationWalk


def test_the_stored_update_is_measured_from_the_current_global_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # round 2 stored: GM_2 = [1, 1]; client 0 returned [3, 1], client 1 (erased) [5, 9];
    # the run's next global model GM_3 = mean = [4, 5]
    # paper: oldU = CM_2,0 - GM_2 = [2, 0], ||oldU|| = 2
    # (the authors' code, from GM_3: [3, 1] - [4, 5] = [-1, -4], length sqrt(17))
    # calibration from newGM_2 = [0, 0] gives [0, 2]: newU = [0, 2], direction [0, 1]
    # newGM_3 = newGM_2 + ||oldU|| newU / ||newU|| = [0, 2]
    path = tmp_path / "round_000002.pt"
    clients = {pid: {"state": {"w": torch.tensor(w)}, protocol.NUM_EXAMPLES: 1.0,
                     protocol.UNIT_WEIGHT: 1.0}
               for pid, w in ((0, [3.0, 1.0]), (1, [5.0, 9.0]))}
    torch.save({"round": 2, "task": 0, "task_round": 2, "global": {"w": torch.tensor([1.0, 1.0])},
                "clients": clients}, path)

    def calibration_round(*args: Any, **kwargs: Any) -> RoundOutcome:
        assert args[7] == [0]  # the remaining client calibrates
        return RoundOutcome(ArrayRecord({"w": torch.tensor([0.0, 2.0])}), [], [], 0, None, [0])

    monkeypatch.setattr(federaser, "train_round", calibration_round)
    job = SimpleNamespace(after=ErasedData(clients=(1,)), request=SimpleNamespace(kind="client"),
                          grid=None, roster=None, config=Config(), cancel=None)
    walk = CalibrationWalk(SimpleNamespace(), ArrayRecord({"w": torch.zeros(2)}),  # type: ignore[arg-type]
                           job, {2: path}, "{}")  # type: ignore[arg-type]
    walk.run_round(RoundInfo(0, 2, 3, 2))
    torch.testing.assert_close(walk.arrays.to_torch_state_dict()["w"], torch.tensor([0.0, 2.0]))
    assert walk.calibrated == 1
