"""What a command does, whatever the front end: the composition root (`services`), the
command catalogue's types and rules (`catalogue`), the generation flow (`flow`), and the
policies every front end applies (moderation and safety, conversations, capture)."""
