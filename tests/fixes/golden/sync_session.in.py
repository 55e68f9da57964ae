from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

engine = create_engine("sqlite://")
SessionLocal = sessionmaker(engine)


def one() -> int:
    session = SessionLocal()
    value = session.execute(text("SELECT 1")).scalar_one()
    session.close()
    return value
