"""The constraint types of the hyperparameters, the registry's checks, and the bugs the constraints now refuse."""

from dataclasses import dataclass
from typing import Any

import pytest
import torch

import fewclip.methods as M
from fewclip.methods.base import Method
from fewclip.methods.params import (
    Boolean,
    Integral,
    Interval,
    Optional,
    Options,
    Real,
    SequenceOf,
    param,
)
from fewclip.methods.registry import register

CONSTRAINTS = [
    Interval(Real, 0, None, closed="neither"),
    Interval(Real, 0, None, closed="left"),
    Interval(Real, 0, 1, closed="left"),
    Interval(Real, 0, 1, closed="both"),
    Interval(Real, None, 3, closed="right"),
    Interval(Real, None, None, closed="neither"),
    Interval(Integral, 1, None, closed="left"),
    Interval(Integral, 0, None, closed="left"),
    Interval(Integral, -2, 5, closed="neither"),
    Options(("val", "none")),
    Boolean(),
    SequenceOf(Interval(Integral, 1, None, closed="left"), length=3),
    SequenceOf(Interval(Real, 0, None, closed="left"), min_length=1),
    SequenceOf(Interval(Real, 0, 1, closed="both")),
    Optional(Interval(Integral, 1, None, closed="left")),
]


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=repr)
def test_invalid_values_are_invalid_and_the_example_is_valid(constraint):
    assert constraint.is_satisfied_by(constraint.example())
    invalid = constraint.invalid_values()
    assert invalid and not any(constraint.is_satisfied_by(v) for v in invalid)


@pytest.mark.parametrize(
    "constraint, text",
    [
        (Interval(Real, 0, None, closed="neither"), "a finite real number > 0"),
        (Interval(Real, 0, None, closed="left"), "a finite real number ≥ 0"),
        (Interval(Real, 0, 1, closed="left"), "a finite real number in [0, 1)"),
        (Interval(Real, None, 3, closed="right"), "a finite real number ≤ 3"),
        (Interval(Real, None, None, closed="neither"), "a finite real number"),
        (Interval(Integral, 1, None, closed="left"), "a positive integer"),
        (Interval(Integral, 0, None, closed="left"), "a non-negative integer"),
        (Interval(Integral, -2, 5, closed="neither"), "an integer in (-2, 5)"),
        (Options(("val", "none")), "one of ['val', 'none']"),
        (Boolean(), "True or False"),
        (SequenceOf(Interval(Integral, 1, None, closed="left"), length=3), "a list of 3 positive integers"),
        (
            SequenceOf(Interval(Real, 0, None, closed="left"), min_length=1),
            "a non-empty list of finite real numbers ≥ 0",
        ),
        (SequenceOf(Boolean(), min_length=2), "a list of at least 2 booleans"),
        (Optional(Interval(Integral, 1, None, closed="left")), "None or a positive integer"),
    ],
)
def test_constraints_describe_themselves(constraint, text):
    assert constraint.describe() == text


def test_numbers_refuse_bools_strings_and_non_finite_values():
    real, integer = Interval(Real, None, None, closed="neither"), Interval(Integral, None, None, closed="neither")
    assert real.is_satisfied_by(1) and real.is_satisfied_by(-2.5) and integer.is_satisfied_by(-3)
    for bad in (True, False, "1", None, float("nan"), float("inf"), -float("inf"), [1]):
        assert not real.is_satisfied_by(bad), bad
    assert not integer.is_satisfied_by(2.0) and not integer.is_satisfied_by(True)
    closed, open_ = Interval(Real, 0, 1, closed="both"), Interval(Real, 0, 1, closed="neither")
    assert closed.is_satisfied_by(0) and closed.is_satisfied_by(1) and not open_.is_satisfied_by(0)
    assert not open_.is_satisfied_by(1) and open_.is_satisfied_by(0.5)


def test_sequences_accept_lists_and_tuples_only():
    steps = SequenceOf(Interval(Integral, 1, None, closed="left"), length=2)
    assert steps.is_satisfied_by([200, 20]) and steps.is_satisfied_by((200, 20))
    for bad in ("20", {200: 1, 20: 2}, [200], [200, 20, 5], [200, 0], [200, 2.5], [True, 1], None):
        assert not steps.is_satisfied_by(bad), bad
    assert Optional(steps).is_satisfied_by(None)
    assert not Options(("a", 1)).is_satisfied_by(True)  # True == 1, but not the option 1


def test_param_checks_its_default_and_its_constraint():
    with pytest.raises(ValueError, match="default -1 does not satisfy its constraint"):
        param(-1, Interval(Integral, 1, None, closed="left"))
    with pytest.raises(TypeError, match="must be a Constraint"):
        param(1, int)


def test_register_refuses_a_method_without_constraints_or_not_a_dataclass():
    class Plain(Method):  # not decorated: its hyperparameters would not be fields
        pass

    with pytest.raises(TypeError, match="decorate it with @dataclass"):
        register("plain-test-method")(Plain)

    @dataclass(kw_only=True, repr=False, eq=False)
    class Unconstrained(Method):
        k: int = 3

    with pytest.raises(TypeError, match=r"hyperparameter\(s\) \['k'\] lack a constraint"):
        register("unconstrained-test-method")(Unconstrained)
    assert "plain-test-method" not in M.list_methods() and "unconstrained-test-method" not in M.list_methods()


# --------------------------------------------------------------------------- the review's reproductions


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("linear-probe", {"C": -1.0}, "linear-probe: C=-1.0 is not valid; expected a finite real number > 0."),
        ("linear-probe", {"max_iter": 0}, "linear-probe: max_iter=0 is not valid; expected a positive integer."),
        ("linear-probe", {"tol": -1e-6}, "linear-probe: tol=-1e-06 is not valid; expected a finite real number > 0."),
        (
            "gda",
            {"alpha_grid": ["x"]},
            "gda: alpha_grid=['x'] is not valid; expected a non-empty list of finite real numbers ≥ 0.",
        ),
        ("ape", {"w_sim": "a"}, "ape: w_sim='a' is not valid; expected a finite real number ≥ 0."),
        ("tip-adapter", {"init_alpha": "big"}, "tip-adapter: init_alpha='big' is not valid; expected a finite real"),
        ("tip-adapter", {"search_step": [0, 5]}, "tip-adapter: search_step=[0, 5] is not valid; expected a list of 2"),
        ("ape", {"channels": True}, "ape: channels=True is not valid; expected None or a positive integer."),
    ],
)
def test_review_bugs_are_refused_with_one_message(bundle, name, params, message):
    model = M.create(name, selection="none", **params)
    with pytest.raises(M.MethodError) as info:
        model.fit(bundle)
    assert str(info.value).startswith(message)
    with pytest.raises(M.NotFittedError):  # not an AttributeError (a failed fit looked fitted before)
        model.predict_logits(bundle.test_features)


def test_selection_on_test_names_the_valid_choices(bundle):
    with pytest.raises(
        M.MethodError,
        match=r"^tip-adapter: selection='test' is not valid; expected one of \['val', 'cv', 'none'\]\. There is no",
    ):
        M.create("tip-adapter", selection="test").fit(bundle)


# --------------------------------------------------------------------------- the data fit reads


@dataclass(kw_only=True, repr=False, eq=False)
class ImageStub(Method):
    """The shape of a method fitted on images: its data has no ``dim``, its features' width is its own."""

    inputs = "images"
    width: int = param(8, Interval(Integral, 1, None, closed="left"), doc="image feature width")

    def _fit(self, data: Any) -> dict[str, Any]:
        self.weights_ = torch.ones(data.num_classes, self.width)
        return {"width": self.width}

    def _fitted_dim(self) -> int:
        return self.width

    def _validation_accuracy(self, data: Any) -> float | None:
        return 50.0 if data.has_val else None

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weights_.T


class Episode:
    """Only what Method.fit reads: has_val, num_classes, shots_per_class(), classnames, without_test()."""

    has_val, num_classes, classnames = True, 3, ["a", "b", "c"]

    def shots_per_class(self):
        return torch.tensor([2, 2, 2])

    def without_test(self):
        return self


def test_fit_needs_only_the_documented_data_attributes():
    model = ImageStub(width=5).fit(Episode())
    assert (model.num_classes_, model.dim_, model.val_accuracy_, model.selection_used_) == (3, 5, 50.0, "val")
    assert model.selected_ == {
        "width": 5,
        "calibration": "none",
        "calibration_offset": 0.0,
        "temperature": 1.0,  # a method fitted on images gets no temperature
    }
    assert model.predict_logits(torch.ones(2, 5)).shape == (2, 3)
    no_val = Episode()
    no_val.has_val = False
    with pytest.raises(M.MethodError, match="needs validation data"):
        ImageStub().fit(no_val)
