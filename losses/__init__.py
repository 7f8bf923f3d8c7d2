"""Built-in loss plugins, imported as ``probloss.losses``: one file per loss, each registers itself.

The registry imports every module here on first use (``probloss.list_losses()``), so a new file with a
``@probloss.register_loss("name")`` class is all a new built-in loss needs.
"""
