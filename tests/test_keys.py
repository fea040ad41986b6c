"""Signing and encryption keys: created private, refused when exposed, never forgiving."""

import stat

import pytest

from fedsynth.privacy.keys import (
    ENCRYPTION_KEY_FILE,
    SIGNING_KEY_FILE,
    DecryptionError,
    KeyFileError,
    KeyStore,
    SignatureError,
)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_created_on_first_use_readable_by_owner_only(tmp_path):
    store = KeyStore(tmp_path / "keys")
    assert not (tmp_path / "keys").exists()
    store.sign(b"x")
    store.encrypt(b"x", b"ad")
    assert mode(tmp_path / "keys") == 0o700
    assert mode(tmp_path / "keys" / SIGNING_KEY_FILE) == 0o600
    assert mode(tmp_path / "keys" / ENCRYPTION_KEY_FILE) == 0o600
    assert len((tmp_path / "keys" / ENCRYPTION_KEY_FILE).read_bytes()) == 32
    assert (tmp_path / "keys" / SIGNING_KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(
        [SIGNING_KEY_FILE, ENCRYPTION_KEY_FILE]
    )  # no temporary files left behind


def test_a_second_store_on_the_same_directory_uses_the_same_keys(tmp_path):
    first = KeyStore(tmp_path)
    signature = first.sign(b"manifest")
    blob = first.encrypt(b"weights", b"bank-v1/weights")
    second = KeyStore(tmp_path)
    second.verify(b"manifest", signature)
    assert second.decrypt(blob, b"bank-v1/weights") == b"weights"
    assert second.public_key_pem() == first.public_key_pem()


@pytest.mark.parametrize("name", [SIGNING_KEY_FILE, ENCRYPTION_KEY_FILE])
def test_key_file_readable_by_others_is_refused_with_chmod_advice(tmp_path, name):
    KeyStore(tmp_path).sign(b"x")
    KeyStore(tmp_path).encrypt(b"x", b"")
    (tmp_path / name).chmod(0o644)
    store = KeyStore(tmp_path)
    use = store.sign if name == SIGNING_KEY_FILE else (lambda d: store.encrypt(d, b""))
    with pytest.raises(KeyFileError) as info:
        use(b"x")
    assert name in str(info.value) and "chmod 600" in str(info.value)


def test_damaged_key_files_are_refused(tmp_path):
    tmp_path.joinpath(SIGNING_KEY_FILE).write_bytes(b"not a key")
    tmp_path.joinpath(SIGNING_KEY_FILE).chmod(0o600)
    tmp_path.joinpath(ENCRYPTION_KEY_FILE).write_bytes(b"short")
    tmp_path.joinpath(ENCRYPTION_KEY_FILE).chmod(0o600)
    store = KeyStore(tmp_path)
    with pytest.raises(KeyFileError, match="Ed25519"):
        store.sign(b"x")
    with pytest.raises(KeyFileError, match="5 bytes"):
        store.encrypt(b"x", b"")


def test_signature_round_trip_and_refusals(tmp_path):
    store = KeyStore(tmp_path / "a")
    signature = store.sign(b"manifest")
    assert len(signature) == 64
    store.verify(b"manifest", signature)
    with pytest.raises(SignatureError):
        store.verify(b"manifesT", signature)
    other = KeyStore(tmp_path / "b").sign(b"manifest")
    with pytest.raises(SignatureError, match="another key"):
        store.verify(b"manifest", other)
    assert b"PUBLIC KEY" in store.public_key_pem()


def test_encryption_round_trip_binds_associated_data(tmp_path):
    store = KeyStore(tmp_path)
    blob = store.encrypt(b"secret weights", b"bank-v1/weights")
    assert b"secret weights" not in blob
    assert store.decrypt(blob, b"bank-v1/weights") == b"secret weights"
    assert store.encrypt(b"secret weights", b"ad") != store.encrypt(b"secret weights", b"ad")
    with pytest.raises(DecryptionError):
        store.decrypt(blob, b"bank-v2/weights")


@pytest.mark.parametrize("position", [0, 12, 20, -1])
def test_one_flipped_byte_is_refused(tmp_path, position):
    store = KeyStore(tmp_path)
    blob = bytearray(store.encrypt(b"secret weights", b"ad"))
    blob[position] ^= 0x01
    with pytest.raises(DecryptionError, match="altered"):
        store.decrypt(bytes(blob), b"ad")


def test_truncated_ciphertext_and_another_stores_key_are_refused(tmp_path):
    store = KeyStore(tmp_path / "a")
    blob = store.encrypt(b"secret", b"ad")
    with pytest.raises(DecryptionError, match="truncated"):
        store.decrypt(blob[:20], b"ad")
    with pytest.raises(DecryptionError, match="another key"):
        KeyStore(tmp_path / "b").decrypt(blob, b"ad")


def test_no_key_material_in_repr_or_messages(tmp_path):
    store = KeyStore(tmp_path)
    store.sign(b"x")
    blob = store.encrypt(b"x", b"")
    key = (tmp_path / ENCRYPTION_KEY_FILE).read_bytes()
    pem = (tmp_path / SIGNING_KEY_FILE).read_bytes()
    assert repr(store) == f"KeyStore(directory={str(tmp_path)!r})"
    with pytest.raises(DecryptionError) as info:
        store.decrypt(blob[:-1] + bytes([blob[-1] ^ 1]), b"")
    message = str(info.value)
    assert key.hex() not in message and pem.decode() not in message
