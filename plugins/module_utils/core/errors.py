"""Typed errors of portguard.hardening.

Every error the collection raises on purpose derives from ``PortguardError``.
Catalog errors carry the path of the offending key (``portguard_flows[2].from``)
so that a user can find it in a large inventory.
"""


class PortguardError(Exception):
    """Base of every error raised on purpose by the collection."""


class CatalogError(PortguardError):
    """A catalog or inventory value was refused; ``path`` names the key."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class SchemaError(CatalogError):
    """Wrong type, missing key or unknown key."""


class UnknownNameError(CatalogError):
    """A name that is neither a network, an inventory group nor a host."""


class AmbiguousNameError(CatalogError):
    """A name defined in more than one namespace, or a reserved name redefined."""


class NameCycleError(CatalogError):
    """Networks that refer to each other in a loop."""


class AddressError(CatalogError):
    """A malformed address or network."""


class PortError(CatalogError):
    """A malformed port or port range."""


class ProtocolError(CatalogError):
    """An unknown protocol."""


class UnsafeStringError(CatalogError):
    """A string that could inject syntax into a rendered rule."""


class EmptyCatalogError(CatalogError):
    """No flows and no explicit deny-all."""


class ExpiryError(CatalogError):
    """A malformed ``expires`` value."""


class LockoutError(CatalogError):
    """A catalog that would cut the management path or the controller."""


class RenderError(PortguardError):
    """A policy the renderer cannot express."""
