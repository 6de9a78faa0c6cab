from conftest import open_room, auth


async def test_chat_round_trip(client):
    ws, welcome, history = await open_room(client, "pt_1", "m1")
    assert welcome["user_id"] == "m1"
    await ws.send_json({"type": "chat", "content": "hi", "client_id": "c1"})
    frames = [await ws.receive_json(timeout=5), await ws.receive_json(timeout=5)]
    assert {f["type"] for f in frames} == {"chat", "ack"}
    response = await client.get("/distributor/chat/rooms/pt_1/messages", headers=auth("t1"))
    assert [m["content"] for m in (await response.json())["messages"]] == ["hi"]
