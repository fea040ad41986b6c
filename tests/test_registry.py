"""Model registry: versions round-trip, and any altered byte or foreign signature is refused."""

import json

import numpy as np
import pytest

from fedsynth.generative.training import train
from fedsynth.privacy.keys import KeyStore
from fedsynth.server.records import Database, Federation, ModelVersionRecord, Run
from fedsynth.server.registry import MANIFEST_FILE, SIGNATURE_FILE, ModelRegistry, RegistryError
from tests.factories import small_frame, small_spec

PRIVACY = {"north": {"epsilon": 0.8, "delta": 1e-5}, "south": {"epsilon": 1.2, "delta": 1e-5}}


@pytest.fixture(scope="module")
def model():
    return train(small_frame(200), small_spec("gan", steps=5))


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/t.db")
    yield database
    database.dispose()


@pytest.fixture
def registry(tmp_path, db):
    return ModelRegistry(tmp_path / "registry", KeyStore(tmp_path / "keys"), db)


def register(registry, model, federation="clinic", **overrides):
    arguments = dict(
        federation=federation,
        sector="hospital",
        run_id=None,
        round=3,
        node_privacy=PRIVACY,
        participants=["north", "south"],
        quality={"fidelity": 0.8},
    )
    arguments.update(overrides)
    return registry.register(model, **arguments)


def test_registered_model_loads_and_samples_the_same_rows(registry, model):
    version = register(registry, model)
    assert (version.id, version.version, version.kind, version.round) == ("clinic-v1", 1, "gan", 3)
    assert version.epsilon == 1.2 and version.delta == 1e-5 and version.sector == "hospital"
    assert version.created_at.tzinfo is not None
    assert sorted(p.name for p in version.path.iterdir()) == [
        MANIFEST_FILE,
        SIGNATURE_FILE,
        "model.json.enc",
        "weights.safetensors.enc",
    ]
    assert [p.name for p in (registry.root / "clinic").iterdir()] == ["v1"]  # no staging left
    loaded = registry.load("clinic-v1")
    assert loaded.sample(500, seed=11).equals(model.sample(500, seed=11))


def test_manifest_is_plain_and_complete_and_stored_in_the_database(registry, model, db):
    version = register(registry, model)
    manifest = json.loads((version.path / MANIFEST_FILE).read_bytes())
    assert manifest["id"] == "clinic-v1" and manifest["node_privacy"] == PRIVACY
    assert manifest["participants"] == ["north", "south"] and manifest["epsilon"] == 1.2
    assert manifest["quality"] == {"fidelity": 0.8} and manifest["kind"] == "gan"
    assert set(manifest["files"]) == {"model.json", "weights.safetensors"}
    assert registry.manifest("clinic-v1") == manifest
    with db.session() as session:
        row = session.get(ModelVersionRecord, "clinic-v1")
        assert json.loads(row.metadata_json) == manifest and row.path == "clinic/v1"
    weights = (version.path / "weights.safetensors.enc").read_bytes()
    assert b"critic" not in weights and b"generator" not in weights  # encrypted at rest


def test_versions_increment_per_federation_and_list_is_newest_first(registry, model):
    ids = [
        register(registry, model).id,
        register(registry, model).id,
        register(registry, model, federation="bank", sector="finance").id,
        register(registry, model).id,
    ]
    assert ids == ["clinic-v1", "clinic-v2", "bank-v1", "clinic-v3"]
    assert [v.id for v in registry.list()] == ["clinic-v3", "bank-v1", "clinic-v2", "clinic-v1"]
    assert registry.get("bank-v1").sector == "finance"
    with pytest.raises(RegistryError, match="not in the registry"):
        registry.get("bank-v9")


def test_a_version_directory_without_a_row_is_never_reused(registry, model):
    (registry.root / "clinic" / "v1").mkdir(parents=True)
    (registry.root / "clinic" / "v1" / "leftover").write_bytes(b"")
    assert register(registry, model).id == "clinic-v2"


@pytest.mark.parametrize(
    "name", ["model.json.enc", "weights.safetensors.enc", MANIFEST_FILE, SIGNATURE_FILE]
)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_one_flipped_byte_in_any_file_is_refused(registry, model, name, where):
    path = register(registry, model).path / name
    data = bytearray(path.read_bytes())
    position = {"start": 0, "middle": len(data) // 2, "end": len(data) - 1}[where]
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="clinic-v1"):
        registry.load("clinic-v1")


def test_manifest_signed_by_another_key_is_refused(registry, model, tmp_path):
    path = register(registry, model).path
    manifest = (path / MANIFEST_FILE).read_bytes()
    (path / SIGNATURE_FILE).write_bytes(KeyStore(tmp_path / "intruder").sign(manifest))
    with pytest.raises(RegistryError, match="signature does not verify"):
        registry.load("clinic-v1")


def test_registry_with_another_key_store_refuses_the_model(registry, model, tmp_path, db):
    register(registry, model)
    intruder = ModelRegistry(registry.root, KeyStore(tmp_path / "intruder"), db)
    with pytest.raises(RegistryError, match="signature does not verify"):
        intruder.load("clinic-v1")


def test_swapped_versions_and_missing_files_are_refused(registry, model):
    first, second = register(registry, model).path, register(registry, model).path
    for name in (MANIFEST_FILE, SIGNATURE_FILE):  # v1's validly signed manifest under v2
        (second / name).write_bytes((first / name).read_bytes())
    with pytest.raises(RegistryError, match="is for 'clinic-v1', not 'clinic-v2'"):
        registry.load("clinic-v2")
    (first / "model.json.enc").unlink()
    with pytest.raises(RegistryError, match="model.json.enc is missing"):
        registry.load("clinic-v1")


def test_ciphertext_moved_between_versions_is_refused(registry, model):
    first, second = register(registry, model).path, register(registry, model).path
    name = "weights.safetensors.enc"
    (second / name).write_bytes((first / name).read_bytes())
    with pytest.raises(RegistryError, match=name):
        registry.load("clinic-v2")


def test_register_checks_its_inputs_and_records(registry, model, db):
    with pytest.raises(ValueError, match="federation name"):
        register(registry, model, federation="../etc")
    with pytest.raises(ValueError, match="north"):
        register(registry, model, node_privacy={"north": {"epsilon": "high", "delta": 0.0}})
    with pytest.raises(RegistryError, match="run 7"):
        register(registry, model, run_id=7)
    register(registry, model)
    with pytest.raises(RegistryError, match="sector"):
        register(registry, model, sector="finance")
    with db.session() as session:
        assert session.get(Federation, "clinic").sector == "hospital"
        session.add(
            Run(federation="clinic", secure_aggregation=True, rounds_planned=3, min_nodes=2)
        )
    assert register(registry, model, run_id=1).id == "clinic-v2"


def test_non_private_model_records_infinite_epsilon(registry, model):
    version = register(
        registry, model, node_privacy={"north": {"epsilon": float("inf"), "delta": 0}}
    )
    assert version.epsilon == float("inf")
    assert registry.get(version.id).epsilon == float("inf")
    assert registry.manifest(version.id)["epsilon"] == "inf"


def test_checkpoints_round_trip_and_the_latest_wins(registry):
    assert registry.latest_checkpoint("clinic", 1) is None
    rng = np.random.default_rng(0)
    rounds = {r: [rng.normal(size=(3, 4)).astype(np.float32), np.arange(5)] for r in (1, 2, 10)}
    for r, arrays in rounds.items():
        path = registry.checkpoint("clinic", 1, r, arrays)
        assert path == registry.root / "clinic" / "checkpoints" / "run1" / f"round{r}"
    latest, arrays = registry.latest_checkpoint("clinic", 1)
    assert latest == 10 and len(arrays) == 2
    for got, want in zip(arrays, rounds[10], strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert registry.latest_checkpoint("clinic", 2) is None
    replaced = [np.zeros(2)]
    registry.checkpoint("clinic", 1, 10, replaced)
    assert np.array_equal(registry.latest_checkpoint("clinic", 1)[1][0], replaced[0])
    many = [np.full(1, i) for i in range(12)]
    registry.checkpoint("clinic", 2, 0, many)
    assert [int(a[0]) for a in registry.latest_checkpoint("clinic", 2)[1]] == list(range(12))


@pytest.mark.parametrize("name", ["weights.safetensors.enc", MANIFEST_FILE, SIGNATURE_FILE])
def test_altered_checkpoint_is_refused(registry, name):
    path = registry.checkpoint("clinic", 1, 4, [np.ones(8)]) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="checkpoint clinic/run1/round4"):
        registry.latest_checkpoint("clinic", 1)
