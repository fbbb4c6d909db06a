"""Strategies that live outside turbofed, loaded the way a user's would be ("module:Class")."""
