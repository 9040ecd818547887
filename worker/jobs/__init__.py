"""What a sample or train job does with the database, storage and the model (never imports the runtime: it is handed a ``base.Run``)."""
