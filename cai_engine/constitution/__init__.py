"""The constitution: its data model (``model``) and how files are read, composed and linted (``load``)."""
