# Copyright: portguard maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

# The work is done by the action plugin of the same name (plugins/action/port_audit.py);
# this file documents its interface.

DOCUMENTATION = r"""
---
module: port_audit
short_description: Audit a host's listening sockets against the portguard catalog
version_added: 0.1.0
description:
  - Compiles the catalog (C(portguard_networks), C(portguard_services), C(portguard_flows), C(portguard_management))
    on the controller, once per play, and classifies every listening socket of the host.
  - V(approved) - reachable from outside the host, and a flow or the management floor of this host lets its
    port and protocol in.
  - V(unapproved) - reachable from outside, and nothing in the catalog lets it in on this host.
  - V(overexposed) - approved, but bound to every address while the catalog lets in only some sources.
    Informational - the firewall narrows it, the socket does not. These listeners also appear under V(approved).
  - V(loopback) - bound to a loopback address or to the C(lo) device; reported, never a violation.
  - V(not_listening) - cataloged services of this host on which nothing reachable from outside listens, per
    service and protocol, port ranges collapsed (a range counts as listening when any port of it does).
  - A socket bound to a specific address counts as reachable even when that address is not one of
    C(portguard_addresses). An IPv6 socket on V(::) that also accepts IPv4 is approved by IPv4 and IPv6 entries.
  - Writes C(<report_dir>/audit/<host>.json) and C(<report_dir>/audit/<host>.xml)
    (JUnit) on the controller. Writing reports is not a change - the task always reports C(changed=false).
  - C(<host>) is the inventory host name with every byte but letters, digits, C(.), C(_) and C(-) written C(%XX)
    (also a leading dot or dash), cut with a hash suffix past 120 characters - one file per host, always inside
    O(report_dir).
  - Process names and command lines are chosen by the process's user - the failure message and the JUnit file show
    every character that does not print as an escape (C(\x1b)), so the JUnit file stays well-formed XML.
author:
  - portguard maintainers (@portguard)
options:
  fail_on:
    description:
      - Fail the task when any item of these classes is found; the message is a table of port, protocol,
        address, process, user and why.
      - V(loopback) listeners never fail the task.
      - Unapproved listeners are failures in the JUnit report whatever this says; the other classes are
        failures there only when named here.
    type: list
    elements: str
    choices: [unapproved, overexposed, not_listening]
    default: []
  listeners:
    description:
      - The listeners to audit, as M(portguard.hardening.port_facts) returns them in
        RV(portguard.hardening.port_facts#module:ansible_facts.portguard_listeners) (documented there, field by field).
      - When not given, the action runs M(portguard.hardening.port_facts) on the host first.
    type: list
    elements: dict
extends_documentation_fragment:
  - portguard.hardening.attributes
  - portguard.hardening.reports
notes:
  - The catalog says which ports a host lets in, not on which of its addresses, so approval depends on port,
    protocol and address family only.
  - Overexposed listeners are approved listeners listed again; they are not counted twice as violations unless
    O(fail_on) names V(overexposed).
seealso:
  - module: portguard.hardening.port_facts
  - module: portguard.hardening.firewall
"""

EXAMPLES = r"""
- name: Audit every host, failing on listeners the catalog does not approve
  portguard.hardening.port_audit:
    fail_on: [unapproved]

- name: Audit listeners gathered earlier, writing the reports for the CI job
  portguard.hardening.port_audit:
    listeners: "{{ ansible_facts.portguard_listeners }}"
    report_dir: "{{ lookup('env', 'CI_PROJECT_DIR') }}/reports"
  register: audit

- name: Show who owns each unapproved listener
  ansible.builtin.debug:
    msg: "{{ audit.unapproved | map(attribute='process') | list }}"
"""

RETURN = r"""
host:
  description: The inventory host audited.
  returned: always
  type: str
  sample: web1
summary:
  description: How many items each list holds.
  returned: always
  type: dict
  sample: {approved: 2, unapproved: 1, overexposed: 1, loopback: 1, not_listening: 1}
approved:
  description:
    - Listeners reachable from outside that the catalog lets in, sorted by port, protocol, family and address.
    - Sockets with the same protocol, address, port and device (C(SO_REUSEPORT) workers) are one item.
  returned: always
  type: list
  elements: dict
  contains:
    proto:
      description: V(tcp) or V(udp).
      type: str
    family:
      description: V(ipv4) or V(ipv6).
      type: str
    address:
      description: The bound address.
      type: str
    port:
      description: The port.
      type: int
    scope:
      description: V(wildcard), V(specific) or V(loopback).
      type: str
    interface:
      description: The device the socket is bound to, or null.
      type: str
    process:
      description: The process name (display-safe, as M(portguard.hardening.port_facts) reports it), or null when no
        process could be found.
      type: str
    pid:
      description: The lowest pid holding the socket, or null.
      type: int
    pids:
      description: Every pid holding the socket.
      type: list
      elements: int
    user:
      description: The user of that process (or of the socket).
      type: str
    cmdline:
      description: The command line of that process.
      type: str
    sockets:
      description: How many sockets this item stands for.
      type: int
    status:
      description: V(approved), V(unapproved) or V(loopback).
      type: str
    overexposed:
      description: Bound to every address while the catalog lets in only some sources.
      type: bool
    labels:
      description: The catalog entries that let the port in (flow, service, purpose, owner).
      type: list
      elements: dict
    services:
      description: The cataloged services that let the port in.
      type: list
      elements: str
    allowed_from:
      description: Per address family the socket accepts, the source networks the catalog lets in on this port.
      type: dict
    reason:
      description: Why the listener got its status, in words.
      type: str
  sample:
    - proto: tcp
      family: ipv4
      address: 10.0.0.5
      port: 8443
      scope: specific
      interface: null
      process: socat
      pid: 31
      pids: [31]
      user: root
      cmdline: socat TCP-LISTEN:8443,bind=10.0.0.5,fork -
      sockets: 1
      status: approved
      overexposed: false
      labels: [{flow: office-app, service: app, purpose: Internal app, owner: web}]
      services: [app]
      allowed_from: {ipv4: [10.20.0.0/16]}
      reason: let in by office-app/app
unapproved:
  description: Listeners reachable from outside that nothing in the catalog lets in; items as in RV(approved).
  returned: always
  type: list
  elements: dict
overexposed:
  description: The approved listeners bound to every address while the catalog lets in only some sources.
  returned: always
  type: list
  elements: dict
loopback:
  description: Listeners only this host can reach; never violations.
  returned: always
  type: list
  elements: dict
not_listening:
  description: Cataloged services of this host that nothing reachable from outside listens on.
  returned: always
  type: list
  elements: dict
  contains:
    service:
      description: The service name.
      type: str
    proto:
      description: V(tcp) or V(udp).
      type: str
    ports:
      description: The ports, ranges collapsed (V(8000-8010)).
      type: str
    flows:
      description: The flows that let the service in.
      type: list
      elements: str
    owner:
      description: The service's owner.
      type: str
    purpose:
      description: The service's purpose.
      type: str
    loopback_only:
      description: Something listens on it, but on loopback only.
      type: bool
    reason:
      description: In words.
      type: str
  sample:
    - service: workers
      proto: tcp
      ports: 8000-8010
      flows: [office-app]
      owner: web
      purpose: App workers
      loopback_only: false
      reason: nothing reachable from outside listens on tcp/8000-8010
fail_on:
  description: The classes that fail the task.
  returned: always
  type: list
  elements: str
violations:
  description: One line per item that failed the task.
  returned: always
  type: list
  elements: str
  sample: ["6379/tcp unapproved: no flow or management entry of this host lets tcp/6379 in (ipv4)"]
report_files:
  description: The reports written on the controller.
  returned: always
  type: dict
  contains:
    json:
      description: The audit as JSON, with RV(fail_on) and whether it failed.
      type: str
    junit:
      description: JUnit XML, one testcase per listener and per not-listening service.
      type: str
  sample: {json: portguard-reports/audit/web1.json, junit: portguard-reports/audit/web1.xml}
"""
