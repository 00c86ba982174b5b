"""The web app and the browser SDK, served by ``tether serve``.

:func:`tether.web.routes.install` registers ``/`` (the app), ``/sdk/tether.js`` (the SDK), the
app's static files, ``/v1/web/*`` and the loopback-only ``POST /v1/dev/login``. See docs/web.md.
"""
