"""UniMM Studio, the web demo over a trained stack (`unimm-demo`, the `[demo]` extra): `backend` holds what the
page does, `app` the Gradio page."""
