"""Every masking check runs on any model that evaluates: a member, or a path of the model, without
gradients is a finding the checks record and fail on, never a traceback."""
import copy

import torch
from conftest import quick_cnn
from torch import nn

from afs_kit.eval.masking import sanity_checks
from afs_kit.models.stack import AFSModel, FeatureStack, LinearMerger


class NoGradient(nn.Module):
    """A member whose features are computed without autograd (a non-differentiable preprocessing, say)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.feature_dim = net, net.feature_dim

    def features(self, x):
        with torch.no_grad():
            return self.net.features(x)

    def forward(self, x):
        return self.net.classifier(self.features(x))


def test_a_member_without_gradients_fails_the_transfer_check_and_crashes_nothing(digits, one_thread):
    net = quick_cnn(digits)
    stack = FeatureStack([net, NoGradient(copy.deepcopy(net))])
    merger = LinearMerger(stack.feature_dim, 10)
    with torch.no_grad():  # the first member's own classifier, the second's features weighted too
        merger.linear.weight.copy_(torch.cat([net.classifier.weight, 0.5 * net.classifier.weight], dim=1))
        merger.linear.bias.copy_(net.classifier.bias)
    model = AFSModel(stack, merger).eval()
    x, y = digits.x_test[:40].float() / 255, digits.y_test[:40]
    out = sanity_checks(model, x, y, eps=0.1, n=40, seed=0, device="cpu")
    transfer = out["checks"]["transfer_not_stronger"]
    assert not transfer["passed"] and transfer["no_gradient"] == ["extractor 1"]
    assert transfer["per_source"]["extractor 1"].startswith("no gradient: ")
    assert "transfer_not_stronger" in out["failed"]
    # the whole model still has gradients through the first member
    assert out["checks"]["nonzero_gradients"]["zero_gradient_share"] < 0.5


def test_the_stacks_own_attacks_follow_each_members_share_of_the_merger(digits, one_thread):
    from afs_kit.eval.masking import MemberLogits, stack_sources

    a, b, c = (quick_cnn(digits) for _ in range(3))
    stack = FeatureStack([a, b, c])
    torch.manual_seed(1)
    model = AFSModel(stack, LinearMerger(stack.feature_dim, 10)).eval()
    x, y = digits.x_test[:40].float() / 255, digits.y_test[:40]
    with torch.no_grad():
        parts = sum(MemberLogits(model, [i])(x) for i in range(3)) - 2 * model.merger.linear.bias
        torch.testing.assert_close(parts, model(x), rtol=1e-5, atol=1e-5)  # the shares add up to the logits
    assert set(stack_sources(model, below=[0, 1])) == {"member 0", "member 1", "member 2", "members below the budget"}
    assert stack_sources(a) == {} and set(stack_sources(model)) == {"member 0", "member 1", "member 2"}
    out = sanity_checks(model, x, y, eps=0.1, n=40, seed=0, device="cpu", below=[0])
    check = out["checks"]["stack_attacks_not_stronger"]
    assert set(check["broke_beyond_reported"]) == {"member 0", "member 1", "member 2"}
    assert all(isinstance(v, int) and v >= 0 for v in check["broke_beyond_reported"].values())
    assert check["other"] <= check["reported"] + 1e-9, "run on what the reported attack left standing"
    # the smallest-margin attack weighs the members' points with the others' (on the examples classified correctly)
    closest = out["checks"]["smallest_margin_not_stronger"]
    assert set(closest["chosen_from"]) <= {"clean", "PGD-100 ce", "PGD-100 cw", "Square 1000", "transfer extractor 0",
                                           "transfer extractor 1", "transfer extractor 2", "transfer logit average",
                                           "stack member 0", "stack member 1", "stack member 2"}
    assert closest["broke_beyond_reported"] >= 0 and 0 <= closest["p"] <= 1
