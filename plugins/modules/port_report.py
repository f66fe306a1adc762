# Copyright: portguard maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

# The work is done by the action plugin of the same name (plugins/action/port_report.py);
# this file documents its interface.

DOCUMENTATION = r"""
---
module: port_report
short_description: Report denied and allowed traffic per host against the portguard catalog
version_added: 0.1.0
description:
  - Per host (the default), runs M(portguard.hardening.port_activity) on the host to read the counters of the
    portguard table or chains and the rate-limited log lines of denied packets written after the previous
    report, and joins them on the controller to the catalog compiled once per play.
  - Denied attempts are grouped by source, destination port and protocol, with count and first and last seen,
    and sources are named after the catalog (inventory hosts, their segments, networks). They come from the log
    lines; a host whose kernel log cannot be read (a container without C(/dev/kmsg)) is reported from its
    counters only, and the report says so.
  - Allowed traffic is reported per whitelist entry and per flow from the per-element counters.
  - New since the last report - counter deltas and the log lines after the saved cursor; when the counters were
    reset in between (an apply that changed the ruleset, a revert, a reboot) the report says when.
  - Writes C(<report_dir>/report/<host>.json) and the state the next report starts from
    (C(<report_dir>/report/state/<host>.json)); C(<host>) is the host name written as M(portguard.hardening.port_audit)
    writes it (C(%XX) for every byte but letters, digits, C(.), C(_) and C(-)).
  - Counts only the kernel's own log records (facility 0) whose message starts with the host's log prefix - the
    prefix elsewhere in a kernel line is text a local user chose.
  - With O(summarize=true) (run once, with the host reports in O(reports)), lists allow entries with zero hits on
    every host per owner (candidates to remove; the management floor and the controller's connection are never
    listed), expired flows and flows expiring within O(expiring_days), writes C(report/report.json),
    C(report/report.html), adds an activity section to C(verify/matrix.html) when it exists, and returns a
    terminal summary in RV(text).
author:
  - portguard maintainers (@portguard)
options:
  unusual_threshold:
    description: A source with this many denied log lines or more (in the report's window) is flagged as unusual.
    type: int
    default: 20
  expiring_days:
    description: With O(summarize), flows expiring within this many days are listed and warned about.
    type: int
    default: 14
  fail_on_expired:
    description: With O(summarize), fail when the catalog holds expired flows (a CI gate).
    type: bool
    default: false
  update_state:
    description: Save the counters and log cursor, so the next report shows what is new since this one.
    type: bool
    default: true
  logs:
    description: Read the deny log lines; false reports from the counters only.
    type: bool
    default: true
  summarize:
    description: Join the host reports in O(reports) instead of reporting on this host. Run it once.
    type: bool
    default: false
  reports:
    description: With O(summarize), the RV(report) of every host.
    type: list
    elements: dict
extends_documentation_fragment:
  - portguard.hardening.attributes
  - portguard.hardening.reports
notes:
  - The log is rate-limited (C(portguard_log_rate), C(portguard_log_burst)); the deny counters are exact, the
    per-source counts from the log are a lower bound under a flood.
  - The kernel drops the log of a network namespace other than the machine's unless
    C(net.netfilter.nf_log_all_netns=1) is set on the machine; the report says when the log rule counted lines
    that never reached the log.
seealso:
  - module: portguard.hardening.port_activity
  - module: portguard.hardening.firewall
"""

EXAMPLES = r"""
- name: Report each host's activity
  portguard.hardening.port_report:
  register: host_report

- name: Summarize, failing on expired flows
  portguard.hardening.port_report:
    summarize: true
    reports: "{{ ansible_play_hosts_all | map('extract', hostvars, ['host_report', 'report']) | list }}"
    fail_on_expired: true
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
report:
  description: Per host - the host's report (see docs/report.md for every key).
  returned: without O(summarize)
  type: dict
  contains:
    denied:
      description: Denied attempts per source, port and protocol - C(src), C(names), C(port), C(proto), C(count),
        C(new), C(first_seen), C(last_seen).
      type: list
      elements: dict
    flows:
      description: Hits per flow and service - C(label), C(owner), C(hits), C(new).
      type: list
      elements: dict
    unused:
      description: Flows and services of this host with zero hits over the observed window.
      type: list
      elements: dict
    deny_counters:
      description: C(denied_in), C(denied_out), C(logged_in), C(logged_out), each with C(total) and C(new).
      type: dict
    reset:
      description: When the counters were reset since the previous report, or null.
      type: dict
report_file:
  description: Per host - the JSON report written on the controller.
  returned: without O(summarize)
  type: str
text:
  description: The terminal summary.
  returned: with O(summarize)
  type: str
summary:
  description: Every host's report, C(unused_by_owner), C(expired), C(expiring), C(unusual).
  returned: with O(summarize)
  type: dict
expired:
  description: Expired flows (C(name), C(path), C(expires), C(owners)).
  returned: with O(summarize)
  type: list
  elements: dict
expiring:
  description: Flows expiring within O(expiring_days) (C(name), C(path), C(expires), C(days_left), C(owners)).
  returned: with O(summarize)
  type: list
  elements: dict
unused_by_owner:
  description: Per owner, the flows and services with zero hits on every host that renders them.
  returned: with O(summarize)
  type: dict
unusual:
  description: Sources at or above O(unusual_threshold), with the host that saw them.
  returned: with O(summarize)
  type: list
  elements: dict
report_files:
  description: With O(summarize), the files written (C(json), C(html), and C(verify_html) when the verify page was extended).
  returned: with O(summarize)
  type: dict
"""
