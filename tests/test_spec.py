"""Spec files: every mistake is reported with the file and the key to fix."""

import math

import pytest

from fedsynth.generative.spec import SpecError, load_spec, parse_spec
from tests.factories import FEDERATIONS, small_spec_dict


def _error(raw: dict) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw, source="clinic.toml")
    return str(caught.value)


def test_a_valid_spec_loads_with_its_schema():
    spec = parse_spec(small_spec_dict())
    assert spec.schema.target.name == "outcome"
    assert [c.name for c in spec.schema.identifiers] == ["patient"]
    assert spec.training.planned_steps(1000) == 6


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda r: r["model"].update(kind="diffusion"),
            "model.kind: Input should be 'gan', 'vae' or 'marginals'",
        ),
        (
            lambda r: r["privacy"].update(target_epsilon=0),
            "privacy.target_epsilon: must be greater than 0",
        ),
        (
            lambda r: r["privacy"].update(target_epsilon=-2.5),
            "privacy.target_epsilon: must be greater than 0",
        ),
        (lambda r: r["privacy"].update(delta=1.0), "privacy.delta: Input should be less than 1"),
        (
            lambda r: r["columns"][1].update(categories=[]),
            "columns[1] (ward): categories must list at least one",
        ),
        (
            lambda r: r["columns"][1].update(categories=["a", "a"]),
            "columns[1] (ward): categories are listed twice: ['a']",
        ),
        (lambda r: r["columns"][3].pop("max"), "columns[3] (age): min and max are required"),
        (
            lambda r: r["columns"][3].update(min=50, max=10),
            "columns[3] (age): max (10) must be greater than min (50)",
        ),
        (
            lambda r: r["columns"][4].update(type="text"),
            "columns[4] (visits).type: Input should be",
        ),
        (
            lambda r: r["columns"].append(dict(r["columns"][3])),
            "columns: duplicate column names: ['age'] (at columns[3], columns[8])",
        ),
        (
            lambda r: r["privacy"].update(target_epsilon=float("nan")),
            "privacy.target_epsilon: must be greater than 0",
        ),
        (lambda r: r["privacy"].update(delta=0), "privacy.delta: Input should be greater than 0"),
        (
            lambda r: r["training"].update(epochs=3),
            "set exactly one of training.epochs and training.steps",
        ),
        (lambda r: r["model"].update(hidden=[8]), "model.hidden: unknown key"),
        (lambda r: r.pop("privacy"), "privacy: required key is missing"),
        (
            lambda r: r["columns"][6].update(min="first of may"),
            "'first of may' is not an ISO 8601 date",
        ),
    ],
)
def test_each_mistake_names_its_key(change, message):
    raw = small_spec_dict()
    change(raw)
    text = _error(raw)
    assert text.startswith("clinic.toml: ")
    assert message in text


def test_all_mistakes_are_reported_at_once():
    raw = small_spec_dict()
    raw["model"]["kind"] = "x"
    raw["privacy"]["target_epsilon"] = 0
    text = _error(raw)
    assert "model.kind" in text and "privacy.target_epsilon" in text


def test_inf_epsilon_means_no_dp():
    for value in (math.inf, "inf", "Infinity"):
        raw = small_spec_dict()
        raw["privacy"]["target_epsilon"] = value
        spec = parse_spec(raw)
        assert not spec.privacy.is_private


def test_file_level_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nkind = "gan"\nkind = "vae"\n')
    with pytest.raises(SpecError, match=r"bad.toml: invalid TOML: .*\(at line 3, column 13\)"):
        load_spec(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[federation]\nname = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(latin)


def test_a_file_with_an_unknown_model_kind_names_the_file_and_the_key(tmp_path):
    spec = tmp_path / "bank.toml"
    spec.write_text(
        (FEDERATIONS / "bank.toml").read_text().replace('kind = "gan"', 'kind = "ddpm"')
    )
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    assert str(caught.value) == "bank.toml: model.kind: Input should be 'gan', 'vae' or 'marginals'"


def test_delta_must_be_below_one_over_the_rows():
    spec = parse_spec(small_spec_dict())  # delta 1e-4
    assert spec.rows_problem(9_999) is None
    assert spec.rows_problem(10_000) == (
        "privacy.delta = 0.0001 must be below 1/rows = 0.0001 (10000 rows); a larger delta "
        "allows releasing a whole row"
    )
    assert spec.rows_problem(1) == "need at least 2 rows to train, got 1"
    raw = small_spec_dict(epsilon=math.inf)
    assert parse_spec(raw).rows_problem(10_000) is None  # no DP, no delta
