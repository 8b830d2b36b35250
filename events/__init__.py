"""sandboxd.events"""
