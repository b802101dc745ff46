"""The browser page ``prato-app`` (gradio; the ``app`` extra): see :mod:`prato_exp.app.server`."""
