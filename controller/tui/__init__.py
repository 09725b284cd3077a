"""The Textual TUI: a thin front end over the session engine.

``app.make_app`` builds it; ``engine`` is the port to the session engine (and a
rehearsal engine); ``state`` folds engine events into what the screens show.
"""
