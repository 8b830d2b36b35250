"""sandboxd.actors"""
