"""SSD's selection bound: with importances on all data, the forget set among it,
I_D >= (B_f / B) I_f for every parameter, so a parameter can be selected (I_f > alpha I_D) only
if alpha < B / B_f. fedcl checks it before the run and again on the clients' counts."""

from __future__ import annotations

import math

import pytest
import torch

from fedcl.config import Config
from fedcl.data.scenarios import build_scenario
from fedcl.erasure import parse_schedule
from fedcl.unlearning_math import fisher_importance, ssd_dampen, ssd_selection_bound
from strategies.unlearning.ssd import SSD, SSDParams, importance_batches, selection_warning


def test_the_bound_by_hand() -> None:
    # 1 forget batch among 7: a parameter that only the forget batch moves has
    # I_f = g^2 and I_D = g^2 / 7, the largest ratio there can be: 7 = B / B_f
    assert ssd_selection_bound(7, 1) == 7.0
    assert math.isinf(ssd_selection_bound(7, 0))  # nothing to forget: no bound to speak of
    model = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    forget = [(torch.tensor([[1.0]]), torch.tensor([0]))]
    retain = [(torch.tensor([[0.0]]), torch.tensor([1]))] * 6  # zero input: zero gradient
    i_f = fisher_importance(model, forget)
    i_all = fisher_importance(model, [*forget, *retain])
    torch.testing.assert_close(i_all["weight"], i_f["weight"] / 7)
    theta = {"weight": model.weight.detach().clone()}
    # at alpha = 7 = B / B_f nothing is selected; just below, both weights are
    assert torch.equal(ssd_dampen(theta, i_all, i_f, alpha=7.0, lam=1.0)["weight"],
                       theta["weight"])
    damped = ssd_dampen(theta, i_all, i_f, alpha=6.9, lam=1.0)["weight"]
    torch.testing.assert_close(damped, theta["weight"] / 7)  # beta = lam I_D / I_f = 1/7


def test_the_warning_is_one_line_naming_the_largest_useful_alpha() -> None:
    line = selection_warning("class=3,after-task=2", alpha=10.0, batches_all=36,
                             batches_forget=5)
    assert line == ("ssd: erasure 'class=3,after-task=2' cannot dampen anything at alpha 10: "
                    "its forget data is 5 of the 36 importance batches, so I_f <= 7.2 I_D for "
                    "every parameter; only alpha below 7.2 can select one")
    assert selection_warning("class=3,after-task=2", alpha=5.0, batches_all=36,
                             batches_forget=5) is None


def test_check_requests_counts_the_batches_the_clients_will_use() -> None:
    """3 clients, IID, class-IL Split-MNIST: class 1 erased after task 0 is half of task 0's
    data (the bound about 2), a client erased after task 1 a third of the data (about 3)."""
    config = Config(clients=3, partition="iid", tasks=5, scenario="class-il",
                    task_order_seed=None, unlearning="ssd")
    scenario = build_scenario(config)
    schedule = parse_schedule("class=1,after-task=0; client=2,after-task=1")
    counts = importance_batches(config, scenario, schedule, SSDParams().batch_size)
    (all0, forget0), (all1, forget1) = counts
    assert 1.7 < all0 / forget0 < 2.2 and 2.7 < all1 / forget1 < 3.3
    method = SSD(SSDParams(), None)
    lines = method.check_requests(config, scenario, schedule)
    assert len(lines) == 2 and all("only alpha below" in line for line in lines)
    # said once before the run; the erasure itself repeats only a line the check did not say
    assert method.announced == set(lines)
    assert SSD(SSDParams(alpha=1.5), None).check_requests(config, scenario, schedule) == []


@pytest.mark.parametrize("alpha", [1.5, 10.0])
def test_the_request_entry_reports_the_bound(alpha: float) -> None:
    method = SSD(SSDParams(alpha=alpha), None)
    method.selected, method.total, method.bound = 0, 10, 2.0
    assert method.report() == {"dampened_share": 0.0, "alpha_bound": 2.0}
