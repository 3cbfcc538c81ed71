"""The HTTP door: guards in front of BentoML (API key, body limits, admission at the door, connection
spreading), the API docs' rewrites, and the introspection routes with the inspector page (ui/)."""
