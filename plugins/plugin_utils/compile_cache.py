"""The controller's one compile cache, used by the action plugins and the filters alike.

Each host's task runs in its own forked worker; the first worker to need a compile makes it and
stores it, the others load it, and a process that asks again gets the object it already holds.
The key covers every input the compile reads (the catalog variables, the groups, the selected
host variables of all hosts, the date that decides expiry) plus the caller's scope (an action:
its task and check mode; the filters: one scope of their own), so that a ``serial:`` batch whose
facts differ never reuses another batch's compile.

Only this user may write where the cache lives: ``$XDG_RUNTIME_DIR/portguard`` when that runtime
directory is this user's and private, else ``~/.cache/portguard`` (the home of the effective
user, not ``$HOME``). The directory is opened without following a symlink and refused unless it
belongs to the effective user and has no group or other permission bits; every file is then
opened relative to it. A stored compile is a pickle (the compiled catalog is a graph of objects;
a data-only form loaded several times slower, see docs/benchmarks.md), so it is signed
with HMAC-SHA256 under a per-user random secret (0600, in that directory) and checked before
it is read; the unpickler only builds the catalog's own classes.
"""

import datetime
import fcntl
import gc
import hashlib
import hmac
import io
import json
import os
import pickle
import pwd
import stat
import time

from ansible.errors import AnsibleActionFail, AnsibleError

from ansible_collections.portguard.hardening.plugins.module_utils.core import policy
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog import compiler as catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog import inventory, schema
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.inventory import select_hostvars
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import catalog_vars
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import Policy, gc_paused

CACHE_MAX_AGE = 3600
SIGNING_KEY_FILE = "signing-key"
LOCK_FILE = "lock"
SUFFIX = ".policy"
_MAC_BYTES = hashlib.sha256().digest_size
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
# The classes a compiled catalog is made of; nothing else is built when a stored compile is read.
_MODULES = {module.__name__: module for module in (catalog, inventory, policy, schema)}
_ALLOWED = {("datetime", "date"): datetime.date}
# The compile this process holds: one catalog per play, so one entry keeps memory bounded.
_HELD: dict = {}
FILTER_SCOPE = ("filter",)


class CacheRefused(AnsibleError):
    """The cache directory or one of its files is not this user's own and private."""


class _CatalogUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None and module in _MODULES:
            candidate = getattr(_MODULES[module], name, None)
            found = candidate if isinstance(candidate, type) else None
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a compiled catalog")
        return found


def _private(st) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def cache_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        try:
            st = os.lstat(runtime)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and _private(st):
            return os.path.join(runtime, "portguard")
    return os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache", "portguard")


def _refuse(path, why):
    raise CacheRefused(f"portguard compile cache {path} refused: {why}. It must be a directory (not a symlink) "
                       f"of uid {os.geteuid()} with no group or other permissions; remove or fix it.")


def open_cache_dir(path: str) -> int:
    """A descriptor of the cache directory, created if missing, after checking that only we can write it."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
    except OSError as exc:  # ELOOP or ENOTDIR: a symlink or a file stands there
        _refuse(path, f"cannot open it as a directory without following links ({exc.strerror})")
    st = os.fstat(fd)
    if not _private(st):
        os.close(fd)
        _refuse(path, f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}")
    return fd


def _open_private(name, dir_fd, flags, path):
    fd = os.open(name, flags | _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not _private(st):
        os.close(fd)
        _refuse(os.path.join(path, name), f"not a private regular file of this user (uid {st.st_uid}, "
                                          f"mode {stat.S_IMODE(st.st_mode):04o})")
    return fd


def _secret(dir_fd, path) -> bytes:
    """The per-user key that signs stored compiles (made once; callers hold the directory's lock)."""
    try:
        fd = _open_private(SIGNING_KEY_FILE, dir_fd, os.O_RDONLY, path)
    except FileNotFoundError:
        fd = _open_private(SIGNING_KEY_FILE, dir_fd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
        fd = _open_private(SIGNING_KEY_FILE, dir_fd, os.O_RDONLY, path)
    with os.fdopen(fd, "rb") as handle:
        secret = handle.read()
    if len(secret) != 32:
        _refuse(os.path.join(path, SIGNING_KEY_FILE), "the signing secret is not 32 bytes")
    return secret


def _load(name, dir_fd, path, secret, key):
    try:
        fd = _open_private(name, dir_fd, os.O_RDONLY, path)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        mac, payload = handle.read(_MAC_BYTES), handle.read()
    if not hmac.compare_digest(mac, hmac.new(secret, key.encode() + payload, hashlib.sha256).digest()):
        return None  # not written by us under this key: compile again and replace it
    # Without the collector: tens of thousands of objects and no cycles (docs/benchmarks.md)
    with gc_paused():
        return _CatalogUnpickler(io.BytesIO(payload)).load()


def _store(name, dir_fd, secret, key, value):
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    mac = hmac.new(secret, key.encode() + payload, hashlib.sha256).digest()
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as handle:
        handle.write(mac)
        handle.write(payload)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _expire(dir_fd):
    now = time.time()
    for name in os.listdir(dir_fd):
        if name in (SIGNING_KEY_FILE, LOCK_FILE):
            continue
        try:
            if now - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime > CACHE_MAX_AGE:
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def compile_inputs(variables, groups, hostvars) -> str:
    """Everything the compile reads, as one JSON text: the cache key is made from it.

    ``variables`` holds the catalog variables (a host's variables will do), ``groups`` and ``hostvars``
    are Ansible's magic variables; only the per-host variables the compiler reads are kept.
    """
    groups = {name: list(members) for name, members in groups.items()}
    selected = select_hostvars(hostvars, groups.get("all", []))
    return json.dumps([catalog_vars(variables), groups, selected], default=str)


def cached_compile(variables, groups, hostvars, scope, *, today=None) -> Policy:
    """The compiled catalog: held by this process, else loaded from the cache, else compiled and stored.

    Raises ``CacheRefused`` when the cache directory is not private, ``PortguardError`` when the catalog
    does not compile.
    """
    today = today or datetime.datetime.now(datetime.UTC).date()
    inputs = compile_inputs(variables, groups, hostvars)
    key = hashlib.sha256(json.dumps([scope, today.isoformat()]).encode() + inputs.encode()).hexdigest()
    if key not in _HELD:
        compiled = _load_or_compile(key, inputs, today)
        _HELD.clear()
        _HELD[key] = compiled
    return _HELD[key]


def compiled_policy(task_vars, scope, *, today=None) -> Policy:
    """An action's compiled catalog: made by the first worker of a play, loaded by the others."""
    try:
        compiled = cached_compile(task_vars, task_vars["groups"], task_vars["hostvars"], scope, today=today)
    except CacheRefused as exc:
        raise AnsibleActionFail(exc.message) from None  # the same words: no second "caused by"
    # A worker process runs one task for one host: the compiled catalog lives until it exits.
    # Frozen, it is left out of the garbage collector's later passes over this worker's heap
    # (the module runs and their results allocate a lot); reference counting still frees objects.
    gc.freeze()
    return compiled


def _load_or_compile(key, inputs, today):
    path = cache_dir()
    dir_fd = open_cache_dir(path)
    try:
        lock_fd = _open_private(LOCK_FILE, dir_fd, os.O_RDWR | os.O_CREAT, path)
        with os.fdopen(lock_fd, "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            secret = _secret(dir_fd, path)
            name = key + SUFFIX
            found = _load(name, dir_fd, path, secret, key)
            if found is not None:
                return found
            variables, groups, hostvars = json.loads(inputs)
            compiled = compile_catalog(variables, groups, hostvars, today=today)
            _store(name, dir_fd, secret, key, compiled)
            _expire(dir_fd)
            return compiled
    finally:
        os.close(dir_fd)
