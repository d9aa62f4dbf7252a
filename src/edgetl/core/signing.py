"""Signed bundles: who made a bundle, who added each head version, and a device that checks both.

A manifest lists every file with its sha256, so signing the manifest's statements covers every
file. Four kinds of statement are signed, with Ed25519 (the ``cryptography`` package). Each names
the operation that made it and covers exactly the fields that operation may change, so a key
allowed one operation cannot sign another's fields (docs/SECURITY.md has the whole threat model):

* **release** (``fit``, ``export``): the manifest's ``release`` block, written once and never
  changed: backbone, preprocessing, target, precision, runtime, the recipe, the hashes of the
  release's files (backbone, tokenizer, report, build scripts, head v1 and its replay memory) and
  head version 1 itself. Later writers can add to a bundle, never rewrite its release.
* **version** (``adapt``, a fleet round): each later head version's entry with the hashes of its
  head and replay-memory files, bound to the release it extends.
* **selection** (``fit``, ``adapt``, a fleet round, ``rollback``): which version is current, the
  labels, the model names, each version's fused model and those files' hashes, and the selection's
  serial. A ``threshold`` key cannot sign it, so it can neither roll back nor swap the app model.
* **thresholds** (every writer, ``threshold`` included): the decision thresholds, bound to one
  selection (its digest) and carrying the state's serial.

**Freshness.** Every write increments the state's ``serial`` (and a selection change sets
``selection_serial`` to it); both are signed. A device with a trust policy records, outside the
bundle (:mod:`edgetl.core.freshness`), the highest serials and the newest release it has accepted
for each bundle path, and refuses an older signed state or release replayed into place (exit 5).
A deliberate rollback is a new state: ``rollback --sign`` writes it with a higher serial.

A device's **trust policy** (``edgetl --trust FILE``, or ``EDGETL_TRUST``) names public keys and
what each may do: ``release``, ``adapt``, ``fleet``, ``rollback``, ``threshold``. With a policy in
force, loading a bundle refuses one that is unsigned, signed by an unknown key, signed by a key
for something it may not do, or whose signed statements do not match its manifest. A factory key
typically may do everything; a device's own key (``--sign`` or ``EDGETL_SIGN_KEY`` on the
device) may adapt, roll back and set thresholds, so heads learned on the device are signed by it.

What a signature does not cover: the files' contents beyond their hashes (a file matching its
hash is the file that was signed), anything outside the bundle, and the secrecy of the private
key (keep ``*.key`` files off the devices that only verify).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TrustError, require
from .compat import tomllib

PREFIX = "edgetl-ed25519"
OPERATIONS = ("release", "adapt", "fleet", "rollback", "threshold")
# The operations that may choose what is current (and so which fused model an app runs).
SELECTION_OPERATIONS = ("release", "adapt", "fleet", "rollback")
# What keygen puts in a new key's policy entry: a factory key may do everything but merge fleet
# rounds; a device's own key may learn on the device and nothing a release fixes.
FACTORY_OPERATIONS = ("release", "adapt", "rollback", "threshold")
DEVICE_OPERATIONS = ("adapt", "rollback", "threshold")
# Fields of a version entry that a later writer may change: thresholds (the thresholds statement)
# and a regenerated fused model (the selection statement); never covered by the version's own.
THRESHOLD_ENTRY_FIELDS = ("unknown_threshold", "threshold", "threshold_policy")
MUTABLE_ENTRY_FIELDS = (*THRESHOLD_ENTRY_FIELDS, "fused", "signature")
# Manifest fields fixed at release.
RELEASE_FIELDS = ("task", "backbone", "target", "precision", "runtime", "exemplars", "anomaly", "training")


def canonical(obj) -> bytes:
    """The bytes a signature is over: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(obj) -> str:
    return hashlib.sha256(canonical(obj)).hexdigest()


def _crypto():
    return require("cryptography.hazmat.primitives.asymmetric.ed25519", extra="base", purpose="signed bundles")


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key and the name it signs as."""

    name: str
    key: Any  # cryptography's Ed25519PrivateKey, imported lazily (an optional extra)

    @property
    def public_raw(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)

    def sign(self, statement, operation: str) -> dict:
        return {
            "key_id": self.key_id,
            "key_name": self.name,
            "operation": operation,
            "signed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sig": base64.b64encode(
                self.key.sign(canonical({"operation": operation, "statement": statement}))
            ).decode(),
        }


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_key(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, PKCS#8 PEM, mode 0600) and ``NAME.pub`` (one line) to ``out_dir``.

    Raises:
        ConfigError: a bad name, or a key of that name exists already (never overwritten).
    """
    ed = _crypto()
    from cryptography.hazmat.primitives import serialization

    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"key name {name!r}: use letters, digits, '-', '_' or '.'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise ConfigError(f"{p}: exists; keys are never overwritten (pick another name or folder)")
    key = ed.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pub_path.write_text(f"{PREFIX} {base64.b64encode(raw).decode()} {name}\n")
    return priv_path, pub_path


def policy_entry(public_line: str, may: tuple[str, ...] | list[str]) -> str:
    """The trust-policy ``[[key]]`` table for a public key line (``edgetl-ed25519 <base64> NAME``)
    allowed ``may``: what keygen prints and what :func:`load_trust` reads back."""
    name = public_line.split()[-1]
    ops = ", ".join(f'"{m}"' for m in may)
    return f'[[key]]\nname = "{name}"\npublic_key = "{public_line.strip()}"\nmay = [{ops}]'


def load_signing_key(path: str | Path) -> SigningKey:
    """A private key written by :func:`generate_key` (its name is the file's stem).

    Raises:
        ConfigError: missing or not an Ed25519 private key.
    """
    ed = _crypto()
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such signing key; make one with: edgetl keygen NAME") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key; make one with: edgetl keygen NAME")
    return SigningKey(path.stem, key)


def signing_key_from(option: str | Path | None) -> SigningKey | None:
    """The key a writer signs with: ``--sign`` if given, else ``EDGETL_SIGN_KEY``, else none."""
    path = option or os.environ.get("EDGETL_SIGN_KEY")
    return load_signing_key(path) if path else None


def parse_public(text: str, where: str) -> bytes:
    parts = text.strip().split()
    b64 = parts[1] if parts and parts[0] == PREFIX and len(parts) >= 2 else (parts[0] if parts else "")
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{where}: not an edgetl public key (expected '{PREFIX} <base64> NAME' from edgetl keygen)")
    return raw


@dataclass(frozen=True)
class TrustedKey:
    name: str
    public_raw: bytes
    may: frozenset[str]

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)


@dataclass(frozen=True)
class TrustPolicy:
    """Public keys and what each may do to a bundle on this device."""

    keys: tuple[TrustedKey, ...]
    source: str = ""

    def key(self, kid: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.key_id == kid), None)


def load_trust(path: str | Path) -> TrustPolicy:
    """Read a trust policy (TOML: ``[[key]] name, public_key, may = [...]``).

    Raises:
        ConfigError: unreadable, unknown keys or operations, or a public key that is not one.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such trust policy file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    except OSError as exc:  # a folder, a permission: not a policy edgetl can read
        raise ConfigError(f"{path}: cannot read the trust policy ({exc.strerror or exc}); give a TOML file") from None
    extra = set(data) - {"key"}
    if extra:
        raise ConfigError(f"{path}: unknown key {sorted(extra)[0]!r}; a trust policy holds [[key]] tables")
    keys = []
    entries = data.get("key", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(
            f"{path}: key = {str(entries)[:40]}; a trust policy holds [[key]] tables (name, public_key, may)"
        )
    for i, entry in enumerate(entries):
        where = f"{path} [[key]] #{i + 1}"
        unknown = set(entry) - {"name", "public_key", "may"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; valid keys: name, public_key, may")
        may = entry.get("may", [])
        bad = [m for m in may if m not in OPERATIONS] if isinstance(may, list) else [may]
        if not isinstance(may, list) or bad or not may:
            raise ConfigError(f"{where}: may = {may!r}; list some of {', '.join(OPERATIONS)}")
        public = entry.get("public_key", "")
        if not isinstance(public, str):
            raise ConfigError(f"{where}: public_key should be the text edgetl keygen printed (or a .pub file name)")
        if Path(str(public)).suffix == ".pub" and (path.parent / public).is_file():
            public = (path.parent / public).read_text()
        keys.append(TrustedKey(str(entry.get("name", f"key{i + 1}")), parse_public(str(public), where), frozenset(may)))
    if not keys:
        raise ConfigError(f"{path}: trusts no key; add a [[key]] with name, public_key and may")
    return TrustPolicy(tuple(keys), str(path))


# The policy file the command line named (``edgetl --trust``); it wins over EDGETL_TRUST.
_trust_path: str | None = None


def use_trust(path: str | Path | None) -> None:
    """Make ``path`` this process's trust policy (None: EDGETL_TRUST decides again). The CLI calls
    it with ``--trust``; the environment of the process is left as it was."""
    global _trust_path
    _trust_path = str(path) if path else None


def trust_path() -> str | None:
    """The trust policy in force: the one :func:`use_trust` named, else ``EDGETL_TRUST``, else None."""
    return _trust_path or os.environ.get("EDGETL_TRUST") or None


def policy_from_env() -> TrustPolicy | None:
    """The trust policy in force (:func:`trust_path`), read and checked; None without one."""
    path = trust_path()
    return load_trust(path) if path else None


# ----------------------------------------------------------------------------- statements
def version_core(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in MUTABLE_ENTRY_FIELDS}


def version_files(entry: dict) -> list[str]:
    return [entry[k] for k in ("file", "exemplars", "drift", "overview") if entry.get(k)]


def release_block(manifest: dict) -> dict:
    """What ``fit`` / ``export`` fixes for the bundle's life (see the module docstring)."""
    v1 = next(e for e in manifest["head"]["versions"] if e["version"] == 1)
    fused = set(_fused_files(manifest))
    return {
        "fields": {k: manifest[k] for k in RELEASE_FIELDS if k in manifest},
        "models": {k: v for k, v in manifest.get("models", {}).items() if k != "fused"},
        "files": {rel: e["sha256"] for rel, e in manifest["files"].items() if rel not in fused},
        "version1": version_core(v1),
    }


def version_statement(manifest: dict, entry: dict) -> dict:
    return {
        "release": digest(manifest["release"]),
        "entry": version_core(entry),
        "files": {rel: manifest["files"][rel]["sha256"] for rel in version_files(entry)},
    }


def state_serials(manifest: dict) -> tuple[int, int]:
    """(serial, selection_serial) of a manifest's state; 0 for bundles written before serials."""
    st = manifest.get("state") or {}
    return int(st.get("serial", 0)), int(st.get("selection_serial", 0))


def next_state(manifest: dict, operation: str) -> dict:
    """The ``state`` block after one more write by ``operation``: the serial always moves on, the
    selection serial only when the operation may choose what is current."""
    serial, selection = state_serials(manifest)
    serial += 1
    return {"serial": serial, "selection_serial": serial if operation in SELECTION_OPERATIONS else selection}


def _fused_files(manifest: dict) -> list[str]:
    fused = {e.get("fused") for e in manifest["head"]["versions"]} | {manifest.get("models", {}).get("fused")}
    fused.discard(None)
    fused |= {str(Path(f).with_suffix(".bin")) for f in fused if f.endswith(".xml")}
    return sorted(fused)


def selection_statement(manifest: dict) -> dict:
    """What ``fit`` / ``adapt`` / a fleet round / ``rollback`` decide: see the module docstring."""
    return {
        "release": digest(manifest["release"]),
        "selection_serial": state_serials(manifest)[1],
        "current": manifest["head"]["current"],
        "labels": manifest["labels"],
        "models": manifest.get("models", {}),
        "fused": {str(e["version"]): e.get("fused") for e in manifest["head"]["versions"]},
        "files": {rel: manifest["files"][rel]["sha256"] for rel in _fused_files(manifest) if rel in manifest["files"]},
    }


def thresholds_statement(manifest: dict) -> dict:
    """What ``threshold`` (and every other writer) sets, bound to one selection and serial."""
    return {
        "release": digest(manifest["release"]),
        "selection": digest(selection_statement(manifest)),
        "serial": state_serials(manifest)[0],
        "thresholds": manifest.get("thresholds", {}),
        "versions": {
            str(e["version"]): {k: e.get(k) for k in THRESHOLD_ENTRY_FIELDS} for e in manifest["head"]["versions"]
        },
    }


def sign_release(manifest: dict, key: SigningKey) -> dict:
    """A new bundle's manifest with its release block and the release, selection and thresholds
    signatures (state serial 1)."""
    m = dict(manifest)
    m["state"] = {"serial": 1, "selection_serial": 1}
    m["release"] = release_block(m)
    # When it was issued, so a device can tell a replayed older release of the same bundle path.
    m["release"]["issued_ns"] = time.time_ns()
    m["signatures"] = {
        "release": key.sign(m["release"], "release"),
        "selection": key.sign(selection_statement(m), "release"),
        "thresholds": key.sign(thresholds_statement(m), "release"),
    }
    return m


def sign_update(manifest: dict, key: SigningKey, operation: str, new_version: dict | None = None) -> dict:
    """An updated manifest (new version, rollback, threshold) signed by the writer's key: the new
    version's statement, the selection where ``operation`` may change it, and the thresholds.
    The caller has already moved the state's serials on (:func:`next_state`)."""
    if "release" not in manifest:
        raise TrustError(
            "this bundle was released unsigned, so updates to it cannot be signed; re-export it "
            "with --sign KEY from the machine that holds the release key"
        )
    m = dict(manifest)
    if new_version is not None:
        versions = [
            dict(e, signature=key.sign(version_statement(m, e), operation))
            if e["version"] == new_version["version"]
            else e
            for e in m["head"]["versions"]
        ]
        m["head"] = {**m["head"], "versions": versions}
    sigs = {k: v for k, v in m.get("signatures", {}).items() if k != "state"}
    if operation in SELECTION_OPERATIONS:
        sigs["selection"] = key.sign(selection_statement(m), operation)
    sigs["thresholds"] = key.sign(thresholds_statement(m), operation)
    m["signatures"] = sigs
    return m


def _check(policy: TrustPolicy, sig, statement, allowed: tuple[str, ...], what: str, where: str) -> TrustedKey:
    ed = _crypto()
    if not isinstance(sig, dict) or not all(isinstance(sig.get(k), str) for k in ("key_id", "operation", "sig")):
        raise TrustError(f"{where}: {what} is not signed; this device only accepts bundles signed by a trusted key")
    trusted = policy.key(sig["key_id"])
    if trusted is None:
        raise TrustError(
            f"{where}: {what} is signed by key {sig.get('key_name', '?')} ({sig['key_id']}), which "
            f"{policy.source or 'the trust policy'} does not trust"
        )
    op = sig["operation"]
    if op not in allowed or op not in trusted.may:
        raise TrustError(
            f"{where}: {what} was signed for '{op}' by {trusted.name}, which may only {', '.join(sorted(trusted.may))}"
        )
    try:
        ed.Ed25519PublicKey.from_public_bytes(trusted.public_raw).verify(
            base64.b64decode(sig["sig"]), canonical({"operation": op, "statement": statement})
        )
    except Exception:  # InvalidSignature, or a signature that is not base64 / 64 bytes
        raise TrustError(
            f"{where}: {what}'s signature by {trusted.name} does not match the manifest (tampered with after signing?)"
        ) from None
    return trusted


def verify_trust(manifest: dict, policy: TrustPolicy, where: str) -> dict:
    """Check a manifest against a trust policy; returns who signed what.

    Raises:
        TrustError: unsigned, unknown key, a key acting beyond what it may, a bad signature, or a
            manifest that no longer matches its signed release.
    """
    release = manifest.get("release")
    sigs = manifest.get("signatures")
    if not isinstance(release, dict) or not isinstance(sigs, dict):
        raise TrustError(
            f"{where}: the bundle is not signed; this device only accepts bundles signed by a "
            f"trusted key ({policy.source})"
        )
    who: dict[str, Any] = {
        "release": _check(policy, sigs.get("release"), release, ("release",), "the release", where).name
    }
    live = release_block(manifest)
    for part in ("fields", "models", "version1"):
        if live[part] != release.get(part):
            raise TrustError(f"{where}: the manifest's {part} differ from what its release signed; refusing it")
    for rel, sha in live["files"].items():
        if rel in release.get("files", {}) and release["files"][rel] != sha:
            raise TrustError(f"{where}: {rel} is not the file the release signed; refusing it")
    who["versions"] = {}
    for e in manifest["head"]["versions"]:
        if e["version"] == 1:
            continue
        allowed = ("fleet",) if e.get("source") == "fleet" else ("adapt",)
        who["versions"][e["version"]] = _check(
            policy, e.get("signature"), version_statement(manifest, e), allowed, f"head version {e['version']}", where
        ).name
    if "state" in sigs and "selection" not in sigs:
        raise TrustError(
            f"{where}: the current state was signed by an older edgetl whose state signature does not "
            "say what it may change; re-sign it with a newer edgetl (rollback or threshold --sign KEY)"
        )
    who["selection"] = _check(
        policy,
        sigs.get("selection"),
        selection_statement(manifest),
        SELECTION_OPERATIONS,
        "the selection statement (which version and models are current)",
        where,
    ).name
    who["thresholds"] = _check(
        policy, sigs.get("thresholds"), thresholds_statement(manifest), OPERATIONS, "the thresholds statement", where
    ).name
    who["state"] = (
        who["selection"]
        if who["selection"] == who["thresholds"]
        else f"{who['selection']} (thresholds: {who['thresholds']})"
    )
    return who


def delivery_statement(doc: dict, arrays: dict) -> dict:
    """What a fleet server signs when it delivers a merged head: the head's kind, labels, metadata
    and provenance (``doc``, JSON as sent) and every array by dtype, shape and sha256 of its bytes."""
    return {
        "head": {k: doc.get(k) for k in ("kind", "labels", "meta", "provenance")},
        "arrays": {
            name: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
            for name, a in sorted(arrays.items())
        },
    }


def sign_delivery(key: SigningKey, doc: dict, arrays: dict) -> dict:
    """The server's signature of a merged head it delivers (operation ``fleet``)."""
    return key.sign(delivery_statement(doc, arrays), "fleet")


def verify_delivery(policy: TrustPolicy, doc: dict, arrays: dict, where: str) -> str:
    """Check a delivered merged head against this device's trust policy; the signer's name.

    Raises:
        TrustError: unsigned, signed by a key the policy does not trust for ``fleet``, or not the
            head that was signed.
    """
    return _check(
        policy,
        doc.get("signature"),
        delivery_statement(doc, arrays),
        ("fleet",),
        "the fleet server's merged head",
        where,
    ).name


def signature_summary(manifest: dict) -> dict:
    """Who signed what, as the manifest says (unverified: for ``info`` on a device without a policy)."""
    sigs = manifest.get("signatures") or {}
    if not sigs:
        return {"signed": False}
    name = lambda s: f"{s.get('key_name')} ({s.get('key_id')})" if isinstance(s, dict) else None  # noqa: E731
    return {
        "signed": True,
        "release": name(sigs.get("release")),
        "state": name(sigs.get("selection") or sigs.get("state")),
        "thresholds": name(sigs.get("thresholds")),
        "versions": {e["version"]: name(e.get("signature")) for e in manifest["head"]["versions"] if e["version"] != 1},
    }
