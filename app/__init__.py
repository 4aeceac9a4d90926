"""The Gradio app: protect a region of an image, download it, and compare edits of it and of the original.

Needs the ``app`` extra (``pip install 'diffalign[app]'``); start it with ``diffalign app`` or
``launch(create_app(diffalign.inpainting.load_inpainting(spec)))``.
"""

from diffalign.app.ui import create_app, launch

__all__ = ["create_app", "launch"]
