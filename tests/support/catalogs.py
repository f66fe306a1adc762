"""Catalogs shared by tests that need a valid catalog but test something else."""


def ssh_only_catalog(to: str, admin: str = "10.99.0.0/24") -> dict:
    """The smallest useful catalog: ssh from one admin network to ``to`` (a host or group), and as management."""
    return {
        "portguard_networks": {"admin": [admin]},
        "portguard_services": {"ssh": {"port": 22, "proto": "tcp", "purpose": "Remote administration",
                                       "owner": "platform"}},
        "portguard_flows": [{"name": "admin-ssh", "from": "admin", "to": to, "services": ["ssh"]}],
        "portguard_management": {"from": ["admin"], "services": ["ssh"]},
    }
