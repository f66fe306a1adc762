"""Stand-ins for what Ansible hands the host code."""


class FakeModule:
    """What the host code asks of an AnsibleModule: ``check_mode``, ``warn`` (recorded), ``fail_json`` (raises)."""

    check_mode = False
    error = AssertionError  # what fail_json raises; the transaction agent expects the host code's own error

    def __init__(self):
        self.warnings = []

    def warn(self, text):
        self.warnings.append(text)

    def fail_json(self, **result):
        raise self.error(result["msg"])
