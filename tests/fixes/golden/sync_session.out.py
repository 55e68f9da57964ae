from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

engine = create_engine("sqlite://")
SessionLocal = sessionmaker(engine)


def one() -> int:
    with SessionLocal() as session:
        value = session.execute(text("SELECT 1")).scalar_one()
    return value
