"""The runtime guard: the policy, the embedding ``Engine``, the check-revise loop, files, ``cai serve`` and the audit."""
