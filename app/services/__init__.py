"""Use cases of the app. Each function takes a database session (and whatever else it
needs), owns its transaction, and raises :mod:`app.errors` or :mod:`ml.errors` errors.
Nothing here imports the web framework, so the HTML pages, the JSON API and the CLI
call the very same functions.
"""
