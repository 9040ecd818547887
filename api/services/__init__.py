"""The service layer owns the logic; routes stay thin. Services never commit (the session's owner
does) and enqueue by task name through ``shared.db.after_commit``."""
