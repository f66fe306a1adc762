# Copyright: portguard maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``attributes:`` every module of the collection shares; a module adds its support and details."""


class ModuleDocFragment:
    # Every module: check mode, diff mode, Linux hosts.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
  platform:
    description: Target OS/families that can be operated against.
    support: N/A
    platforms: linux
"""

    # A module that only reads the host (or probes from it).
    READ_ONLY = r"""
options: {}
attributes:
  check_mode:
    support: full
    details: The module changes nothing on any host; it does the same in check mode.
  diff_mode:
    support: none
    details: The module changes nothing, so there is no diff to show.
"""

    FACTS = r"""
options: {}
attributes:
  facts:
    description: Action returns an C(ansible_facts) dictionary that will update existing host facts.
    support: full
"""
