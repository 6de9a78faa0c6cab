// Distributor Chat page: a small plain client of the WebSocket protocol.
// (The Vue 3 app replaces this; it keeps the same boot data and protocol.)
(function () {
  'use strict'
  const boot = JSON.parse(document.getElementById('boot').textContent)
  const list = document.getElementById('messages')
  const form = document.getElementById('composer')
  const input = document.getElementById('composer-text')
  const connection = document.getElementById('connection')
  const pending = new Map()  // client_id -> list item
  let lastId = 0
  let socket = null
  let retryDelayMs = 1000
  // A page opened with ?token= (no sign-in cookie yet) hands the same token to its socket.
  const pageToken = new URLSearchParams(location.search).get('token')
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', timeZone: boot.tz || undefined })

  function showTime (element) {
    element.textContent = timeFormat.format(new Date(element.getAttribute('datetime')))
  }
  list.querySelectorAll('time').forEach(showTime)

  for (const item of list.querySelectorAll('[data-id]')) lastId = Math.max(lastId, Number(item.dataset.id))
  list.scrollTop = list.scrollHeight

  function render (message) {
    if (message.id && list.querySelector(`[data-id="${message.id}"]`)) return
    let item = pending.get(message.client_id)
    if (!item || message.user_id !== boot.user_id) {
      item = document.createElement('li')
      list.appendChild(item)
    }
    pending.delete(message.client_id)
    item.className = `message message-${message.type}` + (message.user_id === boot.user_id ? ' mine' : '')
    item.dataset.id = message.id
    item.replaceChildren()
    for (const [cls, text] of [['sender', message.sender_name], ['content', message.content], ['time', message.created_at]]) {
      const part = document.createElement(cls === 'time' ? 'time' : 'span')
      part.className = cls
      part.textContent = text
      if (cls === 'time') { part.setAttribute('datetime', text); showTime(part) }
      item.appendChild(part)
    }
    lastId = Math.max(lastId, message.id)
    list.scrollTop = list.scrollHeight
  }

  function notice (text) {
    const item = document.createElement('li')
    item.className = 'message message-system'
    item.textContent = text
    list.appendChild(item)
  }

  function connect () {
    connection.textContent = '연결 중…'
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws'
    const query = new URLSearchParams({ after: lastId })
    if (pageToken) query.set('token', pageToken)
    socket = new WebSocket(`${scheme}://${location.host}${boot.ws_path}?${query}`)
    socket.onopen = () => { connection.textContent = '온라인'; retryDelayMs = 1000 }
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data)
      if (frame.type === 'history') frame.messages.forEach(render)
      else if (frame.type === 'chat' || frame.type === 'spread') render(frame)
      else if (frame.type === 'system') notice(frame.content)
      else if (frame.type === 'error') notice(`⚠ ${frame.message}`)
    }
    socket.onclose = (event) => {
      if (event.code >= 4400 && event.code < 4500) {
        connection.textContent = `연결 끊김: ${event.reason || event.code}`
        return
      }
      const delay = Math.min(30000, retryDelayMs) * (0.5 + Math.random() / 2)
      retryDelayMs *= 2
      connection.textContent = `${Math.round(delay / 1000)}초 후 다시 연결`
      setTimeout(connect, delay)
    }
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault()
    const content = input.value.trim()
    if (!content || !socket || socket.readyState !== WebSocket.OPEN) return
    const clientId = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random()
    const item = document.createElement('li')
    item.className = 'message mine pending'
    item.textContent = content
    list.appendChild(item)
    pending.set(clientId, item)
    socket.send(JSON.stringify({ type: 'chat', content, client_id: clientId }))
    input.value = ''
  })
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault()
      form.requestSubmit()
    }
  })
  connect()
})()
