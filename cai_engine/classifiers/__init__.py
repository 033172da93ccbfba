"""Constitutional classifiers: a constitution compiled into small trained classifiers for the runtime guard.

``cai classifiers build`` has the feedback model write, for every principle, requests an assistant following it must
decline and harmless look-alikes on the same topics, then replies to both (from the policy model and the feedback
model); the feedback model labels them; offline augmentations (jailbreak-style wrappers, casing, Unicode spellings)
multiply them; the result is split by generation batch and by wrapper template, so the held-out part measures
generalisation rather than memorised phrasing (:mod:`.data`). A linear probe on a frozen small model's activations
is trained on it (:mod:`.probe`), its layer chosen by measurement, and thresholds are calibrated on the held-out part
at a stated false-alarm rate; the result is a folder with safetensors weights and a model card (:mod:`.train`).
The ``classifier`` critic uses such a folder in the guard, ``cai serve`` and the Engine API.
"""
