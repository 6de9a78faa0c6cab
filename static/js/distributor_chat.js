// Distributor Chat: the room list and the chat page, Vue 3 with no build step.
// One IIFE; only `Vue` comes from outside. One reactive store changed by small
// named functions; components take props and emit events. User text is only
// ever shown through {{ }} (text), never v-html.
(function () {
  'use strict'
  const { createApp, reactive, computed, nextTick, onMounted, onBeforeUnmount, ref, watch } = Vue

  const ACK_TIMEOUT_MS = 10000
  const RECONNECT_MIN_MS = 1000
  const RECONNECT_MAX_MS = 30000
  const TYPING_SEND_INTERVAL_MS = 2000
  const TYPING_SHOW_MS = 3000
  const ROOMS_POLL_MS = 3000
  const OLDER_PAGE_SIZE = 50
  const GAP_FETCH_ATTEMPTS = 5
  const GAP_RETRY_MS = 2000
  const NEAR_TOP_PX = 80
  const NEAR_BOTTOM_PX = 120
  const PHOTOS_PATH = '/distributor/chat/photos'
  const PREVIEW_MAX_PX = 480 // a chosen photo's preview, as big as the server's thumbnail
  const THUMB_BOX_PX = { width: 240, height: 320 } // a photo in the thread fits in this box
  const THUMB_MIN_PX = 64 // a panorama's short side is cropped up to this
  const UPLOAD_STALL_MS = 30000 // an upload with no progress for this long has failed
  const CAMERA_PATH = 'M4 8.5A1.5 1.5 0 0 1 5.5 7h2.2l1.4-2h5.8l1.4 2h2.2A1.5 1.5 0 0 1 20 8.5v9a1.5 1.5 0 0 1-1.5 1.5h-13A1.5 1.5 0 0 1 4 17.5z'

  const boot = JSON.parse(document.getElementById('boot').textContent)

  // ------------------------------------------------------------ text ---

  const TEXT = {
    ko: {
      chats: '채팅', logout: '로그아웃', noRooms: '아직 채팅방이 없습니다.', noMessages: '아직 메시지가 없습니다.',
      ended: '종료', back: '채팅 목록', connecting: '연결 중…', online: '온라인', offline: '오프라인 — 인터넷 연결을 확인하세요',
      reconnecting: '{n}초 후 다시 연결', reconnectNow: '지금 연결', typing: '{name}님이 입력 중…',
      message: '메시지', placeholder: '메시지 입력', send: '보내기', spread: '모든 회원에게 공지',
      spreadLabel: '공지', retry: '다시 보내기', delete: '삭제', pending: '보내는 중', failed: '전송 실패',
      unreadByPeer: '상대가 아직 읽지 않음', loadingOlder: '이전 메시지 불러오는 중…', roomEnded: '종료된 세션입니다. 메시지를 읽을 수만 있습니다.',
      stop4401: '로그인이 만료되었습니다. 로그인 링크를 다시 열어 주세요.', stop4403: '이 채팅방에 들어갈 수 없습니다.',
      stop4404: '채팅방이 없습니다.', joined: '{name}님이 들어왔습니다', left: '{name}님이 나갔습니다',
      unread: '읽지 않은 메시지 {n}개', rooms: '{n}개 채팅방', peerOnline: '접속 중', yesterday: '어제',
      bell: {
        on: '알림 켜짐', off: '알림 꺼짐', blocked: '알림 차단됨', unsupported: '알림 지원 안 됨',
        ios: '홈 화면에 추가하면 알림', checking: '알림',
      },
      bellHelp: {
        on: '새 메시지 알림을 받고 있습니다. 누르면 끕니다.', off: '누르면 새 메시지 알림을 켭니다.',
        blocked: '브라우저 설정에서 이 사이트의 알림이 차단되어 있습니다.',
        unsupported: '이 브라우저에서는 알림을 받을 수 없습니다.',
        ios: 'iPhone에서는 공유 버튼 → "홈 화면에 추가" 후 앱에서 알림을 켤 수 있습니다.', checking: '알림 상태 확인 중',
      },
      errors: {
        too_long: '메시지가 너무 깁니다.', empty: '빈 메시지는 보낼 수 없습니다.', invalid_message: '보낼 수 없는 메시지입니다.',
        forbidden: '권한이 없습니다.', rate_limited: '너무 빨리 보내고 있습니다. 잠시 후 다시 보내세요.',
        room_closed: '종료된 세션이라 보낼 수 없습니다.', unavailable: '서버가 저장하지 못했습니다. 다시 보내세요.',
      },
      photo: {
        choose: '사진 첨부', chosen: '보낼 사진', remove: '사진 빼기', caption: '사진 설명 (선택)',
        from: '{name}님이 보낸 사진', open: '사진 크게 보기', viewer: '사진', close: '닫기',
        uploading: '사진 올리는 중 {n}%', cancel: '취소', drop: '여기에 사진을 놓으세요',
        notForSpread: '공지는 글로만 보낼 수 있습니다', unreadable: '미리 볼 수 없는 파일',
      },
      photoErrors: {
        too_large: '사진 파일이 너무 큽니다.', unsupported_media: '보낼 수 없는 파일입니다. JPEG, PNG, WebP, GIF 사진만 됩니다.',
        bad_image: '사진이 너무 크거나 손상되었습니다.', rate_limited: '너무 빨리 보내고 있습니다. 잠시 후 다시 보내세요.',
        unavailable: '서버가 사진을 저장하지 못했습니다. 다시 보내세요.', network: '사진을 올리지 못했습니다. 연결을 확인하고 다시 보내세요.',
        forbidden: '이 채팅방에 사진을 보낼 수 없습니다.', room_closed: '종료된 세션이라 보낼 수 없습니다.', unauthorized: '로그인이 만료되었습니다. 로그인 링크를 다시 열어 주세요.',
      },
    },
    en: {
      chats: 'Chats', logout: 'Sign out', noRooms: 'No chats yet.', noMessages: 'No messages yet.',
      ended: 'Ended', back: 'Chats', connecting: 'Connecting…', online: 'Online', offline: 'Offline — check your connection',
      reconnecting: 'Reconnecting in {n} s', reconnectNow: 'Connect now', typing: '{name} is typing…',
      message: 'Message', placeholder: 'Write a message', send: 'Send', spread: 'Announce to all members',
      spreadLabel: 'Announcement', retry: 'Retry', delete: 'Delete', pending: 'Sending', failed: 'Not sent',
      unreadByPeer: 'Not read yet', loadingOlder: 'Loading earlier messages…', roomEnded: 'This session has ended: read only.',
      stop4401: 'Your sign-in has expired. Open your sign-in link again.', stop4403: 'You cannot enter this chat.',
      stop4404: 'This chat does not exist.', joined: '{name} joined', left: '{name} left',
      unread: '{n} unread', rooms: '{n} chats', peerOnline: 'online', yesterday: 'Yesterday',
      bell: {
        on: 'Notifications on', off: 'Notifications off', blocked: 'Notifications blocked',
        unsupported: 'No notifications here', ios: 'Add to Home Screen for alerts', checking: 'Notifications',
      },
      bellHelp: {
        on: 'You get new-message notifications. Tap to turn them off.', off: 'Tap to get new-message notifications.',
        blocked: 'Notifications for this site are blocked in the browser settings.',
        unsupported: 'This browser cannot show notifications.',
        ios: 'On iPhone: Share → "Add to Home Screen", then turn notifications on in the app.', checking: 'Checking notifications',
      },
      errors: {
        too_long: 'The message is too long.', empty: 'An empty message cannot be sent.', invalid_message: 'This message cannot be sent.',
        forbidden: 'Not allowed.', rate_limited: 'Sending too fast. Wait a moment and retry.',
        room_closed: 'This session has ended; nothing can be sent.', unavailable: 'The server could not store it. Retry.',
      },
      photo: {
        choose: 'Attach a photo', chosen: 'Photo to send', remove: 'Remove photo', caption: 'Add a caption (optional)',
        from: 'Photo from {name}', open: 'Open photo full size', viewer: 'Photo', close: 'Close',
        uploading: 'Uploading photo {n}%', cancel: 'Cancel', drop: 'Drop a photo here',
        notForSpread: 'Announcements are text only', unreadable: 'No preview for this file',
      },
      photoErrors: {
        too_large: 'The photo file is too large.', unsupported_media: 'This file cannot be sent: only JPEG, PNG, WebP or GIF photos.',
        bad_image: 'The image is too large or damaged.', rate_limited: 'Sending too fast. Wait a moment and retry.',
        unavailable: 'The server could not store the photo. Retry.', network: 'The photo did not upload. Check the connection and retry.',
        forbidden: 'Photos cannot be sent to this chat.', room_closed: 'This session has ended; nothing can be sent.', unauthorized: 'Your sign-in has expired. Open your sign-in link again.',
      },
    },
  }
  const firstLanguage = (navigator.languages && navigator.languages[0]) || navigator.language || 'ko'
  const lang = firstLanguage.toLowerCase().startsWith('en') ? 'en' : 'ko'
  document.documentElement.lang = lang

  function t (key, params) {
    const text = key.split('.').reduce((node, part) => node && node[part], TEXT[lang]) || key
    return text.replace(/\{(\w+)\}/g, (_, name) => String(params && params[name] !== undefined ? params[name] : ''))
  }

  const locale = lang === 'en' ? 'en-US' : 'ko-KR'
  const zone = boot.tz || undefined
  function formatter (options) {
    try {
      return new Intl.DateTimeFormat(locale, { ...options, timeZone: zone })
    } catch (error) { // an unknown zone name: the browser's own zone
      return new Intl.DateTimeFormat(locale, options)
    }
  }
  const timeFormat = formatter({ hour: 'numeric', minute: '2-digit' })
  const dayFormat = formatter({ year: 'numeric', month: 'long', day: 'numeric', weekday: 'long' })
  const dayKeyFormat = formatter({ year: 'numeric', month: '2-digit', day: '2-digit' })
  const formatTime = (iso) => timeFormat.format(new Date(iso))

  // The room list's last_activity is "YYYY-MM-DD HH:MM" already in the gym's
  // zone: today shows the time, yesterday a word, older days a short date.
  const isoDayFormat = formatter({ year: 'numeric', month: '2-digit', day: '2-digit' })
  const wallTimeFormat = new Intl.DateTimeFormat(locale, { hour: 'numeric', minute: '2-digit', timeZone: 'UTC' })
  const shortDateFormat = new Intl.DateTimeFormat(locale, { month: 'short', day: 'numeric', timeZone: 'UTC' })
  const longDateFormat = new Intl.DateTimeFormat(locale, { year: 'numeric', month: 'numeric', day: 'numeric', timeZone: 'UTC' })
  function zoneDay (date) {
    const parts = Object.fromEntries(isoDayFormat.formatToParts(date).map((part) => [part.type, part.value]))
    return `${parts.year}-${parts.month}-${parts.day}`
  }
  function formatActivity (lastActivity) {
    const match = /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2})$/.exec(lastActivity || '')
    if (!match) return lastActivity || ''
    const [, year, month, day, hour, minute] = match.map(Number)
    const wall = new Date(Date.UTC(year, month - 1, day, hour, minute))
    const today = zoneDay(new Date())
    if (lastActivity.slice(0, 10) === today) return wallTimeFormat.format(wall)
    if (lastActivity.slice(0, 10) === zoneDay(new Date(Date.now() - 86400000))) return t('yesterday')
    if (String(year) === today.slice(0, 4)) return shortDateFormat.format(wall)
    return longDateFormat.format(wall)
  }
  const formatDay = (iso) => dayFormat.format(new Date(iso))
  const dayKey = (iso) => dayKeyFormat.format(new Date(iso))

  const pageToken = () => new URLSearchParams(location.search).get('token')

  // A page opened with ?token= has no cookie yet: its requests carry the token too.
  function withPageToken (path) {
    const token = pageToken()
    return token ? `${path}${path.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}` : path
  }

  function newClientId () {
    const bytes = crypto.getRandomValues(new Uint8Array(16)) // works outside secure contexts too
    return Array.from(bytes, (byte) => byte.toString(16).padStart(2, '0')).join('')
  }

  // ----------------------------------------------------------- store ---

  const store = reactive({
    rooms: boot.chat_rooms || [],
    messages: [], // stored messages, ascending by id
    notices: [], // join/leave: { key, afterId, text }
    // own messages not yet acked: { client_id, type, content, state, error }; a photo's
    // also has photo ({ id, width, height } once uploaded, else null), needs_upload,
    // preview (a data: URL or null), preview_width/height, progress (0..1 while
    // uploading, else null) and can_retry (false when the server refused the file itself)
    outbox: [],
    viewer: null, // the photo shown full size: { id, width, height, alt }
    participants: {}, // user_id -> { name, role, online, last_read_id }
    status: boot.status || 'active',
    connection: 'connecting', // connecting | online | reconnecting | offline | stopped
    reconnectInS: 0,
    stopReason: '',
    hasOlder: false,
    loadingOlder: false,
    peerTypingUntil: 0,
    now: Date.now(),
  })

  const OUTBOX_KEY_PREFIX = 'distributor_chat:outbox:'
  const outboxKey = `${OUTBOX_KEY_PREFIX}${boot.room_id}:${boot.user_id}`

  // Signing out on a shared front-desk tablet leaves no unsent message behind
  // for the next person to see or send (and, below, no push subscription).
  function forgetUnsentMessages () {
    try {
      const keys = []
      for (let index = 0; index < localStorage.length; index++) keys.push(localStorage.key(index))
      keys.filter((key) => key && key.startsWith(OUTBOX_KEY_PREFIX)).forEach((key) => localStorage.removeItem(key))
    } catch (error) { /* storage disabled: nothing was kept */ }
  }

  // A photo not yet uploaded cannot be kept: its file lives only in this page.
  // One uploaded is kept by its id (the server holds it for a day) and resent.
  function saveOutbox () {
    try {
      const unsent = store.outbox.filter((item) => !item.needs_upload).map(({ client_id, type, content, photo }) =>
        (photo ? { client_id, type, content, photo } : { client_id, type, content }))
      if (unsent.length) localStorage.setItem(outboxKey, JSON.stringify(unsent))
      else localStorage.removeItem(outboxKey)
    } catch (error) { /* storage full or disabled: the outbox still lives in memory */ }
  }

  function loadOutbox () {
    try {
      const saved = JSON.parse(localStorage.getItem(outboxKey) || '[]')
      store.outbox = saved.map((item) => ({ photo: null, preview: null, progress: null, can_retry: true,
        ...item, needs_upload: false, state: 'pending', error: '' }))
    } catch (error) {
      store.outbox = []
    }
  }

  function newestId () {
    return store.messages.length ? store.messages[store.messages.length - 1].id : 0
  }

  function addMessages (incoming) {
    const known = new Set(store.messages.map((message) => message.id))
    const fresh = incoming.filter((message) => !known.has(message.id))
    if (!fresh.length) return
    const merged = store.messages.concat(fresh)
    merged.sort((a, b) => a.id - b.id)
    store.messages = merged
    const mine = new Set(fresh.filter((m) => m.user_id === boot.user_id).map((m) => m.client_id))
    if (mine.size) dropFromOutbox((item) => mine.has(item.client_id))
  }

  function dropFromOutbox (predicate) {
    const kept = store.outbox.filter((item) => !predicate(item))
    for (const item of store.outbox) if (!kept.includes(item)) forgetUpload(item.client_id)
    if (kept.length !== store.outbox.length) {
      store.outbox = kept
      saveOutbox()
    }
  }

  function outboxItem (clientId) {
    return store.outbox.find((item) => item.client_id === clientId)
  }

  function markAcked (frame) {
    const item = outboxItem(frame.client_id)
    if (item && !store.messages.some((message) => message.id === frame.id)) {
      addMessages([{ type: item.type, id: frame.id, room_id: boot.room_id, user_id: boot.user_id,
        sender_name: boot.name, content: item.content, created_at: frame.created_at, client_id: item.client_id,
        photo: item.photo || null }])
    }
    dropFromOutbox((entry) => entry.client_id === frame.client_id)
  }

  function markFailed (clientId, error, canRetry = true) {
    const item = outboxItem(clientId)
    if (item) {
      item.state = 'failed'
      item.error = error || ''
      item.can_retry = canRetry
      item.progress = null
    }
  }

  function setParticipants (list) {
    const participants = {}
    for (const person of list) participants[person.user_id] = { ...person }
    store.participants = participants
  }

  function setPresence (userId, online) {
    const person = store.participants[userId]
    if (person) person.online = online
  }

  function setLastRead (userId, messageId) {
    const person = store.participants[userId]
    if (person && messageId > person.last_read_id) person.last_read_id = messageId
  }

  function addNotice (text) {
    store.notices.push({ key: `n${store.notices.length}-${Date.now()}`, afterId: newestId(), text })
  }

  const peer = computed(() => Object.values(store.participants).find((p) => p.user_id !== boot.user_id) || null)

  // --------------------------------------------------------- socket ---

  // gapAfterId: a resume's history was cut short (has_more), so messages after this
  // id are missing until fetched, though live ones past them already show.
  const connection = { socket: null, attempts: 0, retryTimer: null, countdownTimer: null, lastReadSent: 0, lastTypingSent: 0, resumedAfterId: 0, gapAfterId: 0, gapFill: 0 }
  const ackTimers = new Map()

  function socketUrl () {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws'
    const query = new URLSearchParams()
    // Resume from before a gap still being filled, never past it.
    connection.resumedAfterId = connection.gapAfterId || newestId()
    if (connection.resumedAfterId) query.set('after', String(connection.resumedAfterId))
    if (pageToken()) query.set('token', pageToken()) // a page opened with ?token= has no cookie yet
    const search = query.toString()
    return `${scheme}://${location.host}${boot.ws_path}${search ? '?' + search : ''}`
  }

  function connect () {
    clearTimeout(connection.retryTimer)
    clearInterval(connection.countdownTimer)
    if (store.connection === 'stopped') return
    if (connection.socket && connection.socket.readyState <= WebSocket.OPEN) return
    if (navigator.onLine === false) {
      store.connection = 'offline'
      return
    }
    store.connection = 'connecting'
    const socket = new WebSocket(socketUrl())
    connection.socket = socket
    socket.onmessage = (event) => {
      let frame
      try { frame = JSON.parse(event.data) } catch (error) { return }
      handleFrame(frame)
    }
    socket.onclose = (event) => {
      if (connection.socket !== socket) return
      connection.socket = null
      if (event.code >= 4400 && event.code < 4500) {
        store.connection = 'stopped'
        store.stopReason = TEXT[lang]['stop' + event.code] || event.reason || String(event.code)
        return
      }
      scheduleReconnect()
    }
  }

  function scheduleReconnect () {
    if (navigator.onLine === false) {
      store.connection = 'offline'
      return
    }
    // Exponential backoff with jitter: 1 s, 2 s, 4 s … 30 s, each 50–100 %.
    const ceiling = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** connection.attempts)
    const delay = Math.max(RECONNECT_MIN_MS, ceiling * (0.5 + Math.random() / 2))
    connection.attempts += 1
    const due = Date.now() + delay
    store.connection = 'reconnecting'
    store.reconnectInS = Math.ceil(delay / 1000)
    connection.countdownTimer = setInterval(() => {
      store.reconnectInS = Math.max(0, Math.ceil((due - Date.now()) / 1000))
    }, 250)
    connection.retryTimer = setTimeout(connect, delay)
  }

  function sendFrame (frame) {
    const socket = connection.socket
    if (!socket || socket.readyState !== WebSocket.OPEN || store.connection !== 'online') return false
    socket.send(JSON.stringify(frame))
    return true
  }

  // A photo not uploaded yet is uploaded first; its frame follows the upload.
  function transmit (item) {
    if (item.needs_upload) {
      uploadPhoto(item)
      return
    }
    item.state = 'pending'
    item.error = ''
    const frame = { type: item.type, content: item.content, client_id: item.client_id }
    if (item.photo) frame.photo_id = item.photo.id
    sendFrame(frame)
    clearTimeout(ackTimers.get(item.client_id))
    ackTimers.set(item.client_id, setTimeout(() => {
      if (outboxItem(item.client_id) && item.state === 'pending') markFailed(item.client_id)
    }, ACK_TIMEOUT_MS))
  }

  function handleFrame (frame) {
    switch (frame.type) {
      case 'welcome':
        connection.attempts = 0
        store.connection = 'online'
        store.status = frame.status || store.status
        setParticipants(frame.participants)
        break
      case 'history':
        // has_more looks back on a first connect, forward on a resume (many missed).
        if (!connection.resumedAfterId) store.hasOlder = frame.has_more
        addMessages(frame.messages)
        if (connection.resumedAfterId) {
          const last = frame.messages[frame.messages.length - 1]
          if (frame.has_more) fillGap(last ? last.id : connection.resumedAfterId)
          else stopFillingGap()
        }
        for (const item of store.outbox) if (item.state === 'pending') transmit(item)
        markRead()
        break
      case 'chat':
      case 'spread':
        addMessages([frame])
        if (frame.user_id !== boot.user_id) {
          store.peerTypingUntil = 0
          markRead()
        }
        break
      case 'ack':
        clearTimeout(ackTimers.get(frame.client_id))
        markAcked(frame)
        break
      case 'error':
        if (frame.client_id && outboxItem(frame.client_id)) {
          clearTimeout(ackTimers.get(frame.client_id))
          markFailed(frame.client_id, t('errors.' + frame.code))
        }
        if (frame.code === 'room_closed') store.status = 'ended'
        break
      case 'system':
        setPresence(frame.user_id, frame.event === 'join')
        addNotice(t(frame.event === 'join' ? 'joined' : 'left', { name: frame.name }))
        break
      case 'read':
        setLastRead(frame.user_id, frame.message_id)
        break
      case 'typing':
        if (frame.user_id !== boot.user_id) store.peerTypingUntil = Date.now() + TYPING_SHOW_MS
        break
    }
  }

  function markRead () {
    if (document.visibilityState !== 'visible') return
    // A read pointer covers everything below it: never move it past a gap.
    const readable = connection.gapAfterId || Infinity
    const fromOthers = store.messages.filter((message) => message.user_id !== boot.user_id && message.id <= readable)
    const newest = fromOthers.length ? fromOthers[fromOthers.length - 1].id : 0
    if (newest > connection.lastReadSent && sendFrame({ type: 'read', message_id: newest })) {
      connection.lastReadSent = newest
    }
  }

  function sendTyping () {
    const now = Date.now()
    if (now - connection.lastTypingSent < TYPING_SEND_INTERVAL_MS) return
    if (sendFrame({ type: 'typing' })) connection.lastTypingSent = now
  }

  function queueMessage (content, type) {
    connection.lastTypingSent = 0 // the message ends this bout of typing; the next starts afresh
    const item = reactive({ client_id: newClientId(), type, content, state: 'pending', error: '' })
    store.outbox.push(item)
    saveOutbox()
    transmit(item)
  }

  function retryMessage (clientId) {
    const item = outboxItem(clientId)
    if (item) transmit(item)
  }

  function deleteMessage (clientId) {
    clearTimeout(ackTimers.get(clientId))
    dropFromOutbox((item) => item.client_id === clientId)
  }

  // --------------------------------------------------------- photos ---
  // A photo goes up over HTTP first (XMLHttpRequest: fetch reports no upload
  // progress), then its frame goes over the socket as a text's does, with the same
  // client_id on every retry. Retry uploads again only when the upload failed.

  const photoFiles = new Map() // client_id -> File, until its upload succeeds
  const uploads = new Map() // client_id -> { request, stallTimer } while uploading
  const UPLOAD_ERRORS = { 400: 'bad_image', 401: 'unauthorized', 403: 'forbidden', 404: 'forbidden',
    413: 'too_large', 415: 'unsupported_media', 429: 'rate_limited' }
  const FILE_REFUSED = new Set(['too_large', 'unsupported_media', 'bad_image', 'room_closed']) // would fail again

  const photoUrl = (photoId) => withPageToken(`${PHOTOS_PATH}/${encodeURIComponent(photoId)}`)
  const thumbUrl = (photoId) => withPageToken(`${PHOTOS_PATH}/${encodeURIComponent(photoId)}/thumb`)
  const photosPath = () => withPageToken(`${boot.rooms_path}/${encodeURIComponent(boot.room_id)}/photos`)

  // The size a photo takes in the thread, known before it loads: nothing jumps.
  function thumbSize (width, height) {
    const scale = Math.min(1, THUMB_BOX_PX.width / width, THUMB_BOX_PX.height / height)
    return { width: Math.max(THUMB_MIN_PX, Math.round(width * scale)), height: Math.max(THUMB_MIN_PX, Math.round(height * scale)) }
  }

  // A small preview of a chosen file as a data: URL (the page's CSP takes data:
  // images, not blob:), or null when this browser cannot decode it: the server decides.
  async function previewOf (file) {
    if (typeof createImageBitmap !== 'function') return null
    try {
      const bitmap = await createImageBitmap(file) // applies the EXIF orientation, as the server does
      const { width, height } = bitmap
      const scale = Math.min(1, PREVIEW_MAX_PX / Math.max(width, height))
      const canvas = document.createElement('canvas')
      canvas.width = Math.max(1, Math.round(width * scale))
      canvas.height = Math.max(1, Math.round(height * scale))
      const context = canvas.getContext('2d')
      context.fillStyle = '#fff' // a transparent PNG previews on white, not black
      context.fillRect(0, 0, canvas.width, canvas.height)
      context.drawImage(bitmap, 0, 0, canvas.width, canvas.height)
      bitmap.close()
      return { url: canvas.toDataURL('image/jpeg', 0.85), width, height }
    } catch (error) {
      return null
    }
  }

  function queuePhoto (file, preview, caption) {
    connection.lastTypingSent = 0
    const item = reactive({ client_id: newClientId(), type: 'chat', content: caption, photo: null, needs_upload: true,
      preview: preview ? preview.url : null, preview_width: preview ? preview.width : 0,
      preview_height: preview ? preview.height : 0, progress: null, can_retry: true, state: 'pending', error: '' })
    photoFiles.set(item.client_id, file)
    store.outbox.push(item)
    transmit(item)
  }

  function endUpload (clientId) {
    const upload = uploads.get(clientId)
    if (upload) clearTimeout(upload.stallTimer)
    uploads.delete(clientId)
    return upload
  }

  // Cancel and Delete: the upload stops and the file is let go.
  function forgetUpload (clientId) {
    const upload = endUpload(clientId)
    if (upload) upload.request.abort()
    photoFiles.delete(clientId)
  }

  function uploadFailed (item, code) {
    endUpload(item.client_id)
    markFailed(item.client_id, t('photoErrors.' + code), !FILE_REFUSED.has(code))
  }

  function uploaded (item, body) {
    endUpload(item.client_id)
    photoFiles.delete(item.client_id)
    item.photo = { id: body.photo_id, width: body.width, height: body.height }
    item.needs_upload = false
    item.progress = null
    new Image().src = thumbUrl(body.photo_id) // cached: the stored bubble shows it at once
    saveOutbox()
    transmit(item)
  }

  function uploadPhoto (item) {
    if (uploads.has(item.client_id)) return // on its way already
    const file = photoFiles.get(item.client_id)
    item.state = 'pending'
    item.error = ''
    item.progress = 0
    if (!file) {
      markFailed(item.client_id, t('photoErrors.network'), false)
      return
    }
    const request = new XMLHttpRequest()
    const upload = { request, stallTimer: null }
    const isCurrent = () => uploads.get(item.client_id) === upload
    function watchStall () {
      clearTimeout(upload.stallTimer)
      upload.stallTimer = setTimeout(() => {
        if (!isCurrent()) return
        uploadFailed(item, 'network')
        request.abort()
      }, UPLOAD_STALL_MS)
    }
    request.open('POST', photosPath())
    request.responseType = 'json'
    request.setRequestHeader('Accept', 'application/json')
    request.upload.onprogress = (event) => {
      if (!isCurrent()) return
      if (event.lengthComputable && event.total) item.progress = event.loaded / event.total
      watchStall()
    }
    request.onload = () => {
      if (!isCurrent()) return
      const body = request.response || {}
      if (request.status === 201 && body.photo_id) {
        uploaded(item, body)
        return
      }
      const given = body.error && body.error.code
      if (given === 'room_closed') store.status = 'ended'
      const code = [given, UPLOAD_ERRORS[request.status]].find((known) => known && known in TEXT[lang].photoErrors)
      uploadFailed(item, code || 'unavailable')
    }
    request.onerror = request.ontimeout = () => { if (isCurrent()) uploadFailed(item, 'network') }
    // onabort: whoever aborted (Cancel, Delete, a stall) has settled the item already.
    uploads.set(item.client_id, upload)
    const form = new FormData()
    form.append('photo', file, file.name || 'photo')
    request.send(form)
    watchStall()
  }

  function openPhoto (photo, alt) {
    store.viewer = { id: photo.id, width: photo.width, height: photo.height, alt }
  }

  function closePhoto () {
    store.viewer = null
  }

  async function fetchPage (params) {
    const query = new URLSearchParams({ ...params, limit: String(OLDER_PAGE_SIZE) })
    const response = await fetch(`${boot.messages_path}?${query}`, { headers: { Accept: 'application/json' }, credentials: 'same-origin' })
    if (!response.ok) throw new Error(`HTTP ${response.status}`)
    return response.json()
  }

  async function fetchOlder () {
    if (store.loadingOlder || !store.hasOlder || !store.messages.length) return
    store.loadingOlder = true
    try {
      const page = await fetchPage({ before: String(store.messages[0].id) })
      store.hasOlder = page.has_more
      addMessages(page.messages)
    } catch (error) { /* try again on the next scroll */ } finally {
      store.loadingOlder = false
    }
  }

  function stopFillingGap () {
    connection.gapFill += 1
    connection.gapAfterId = 0
  }

  async function fillGap (afterId) {
    // Page on from the last page's newest id: live messages that arrived meanwhile
    // are newer than the gap, and paging from them would skip it.
    const fill = (connection.gapFill += 1)
    connection.gapAfterId = afterId
    let failures = 0
    while (fill === connection.gapFill && failures < GAP_FETCH_ATTEMPTS) {
      const page = await fetchPage({ after: String(connection.gapAfterId) }).catch(() => null)
      if (fill !== connection.gapFill) return // a newer resume took over
      if (!page) {
        failures += 1
        await new Promise((resolve) => setTimeout(resolve, GAP_RETRY_MS))
        continue
      }
      addMessages(page.messages)
      if (!page.has_more || !page.messages.length) {
        stopFillingGap()
        markRead()
        return
      }
      connection.gapAfterId = page.messages[page.messages.length - 1].id
    }
    // Still missing: the next reconnect resumes from connection.gapAfterId.
  }

  // ------------------------------------------------------ components ---

  const ConnectionStatus = {
    props: { state: String, seconds: Number, reason: String },
    emits: ['reconnect'],
    setup () { return { t } },
    template: `
      <div class="connection" :class="'connection-' + state" role="status" aria-live="polite">
        <span class="connection-dot" aria-hidden="true"></span>
        <span v-if="state === 'connecting'">{{ t('connecting') }}</span>
        <span v-else-if="state === 'online'">{{ t('online') }}</span>
        <span v-else-if="state === 'offline'">{{ t('offline') }}</span>
        <span v-else-if="state === 'stopped'">{{ reason }}</span>
        <template v-else>
          <span>{{ t('reconnecting', { n: seconds }) }}</span>
          <button type="button" class="link-button" @click="$emit('reconnect')">{{ t('reconnectNow') }}</button>
        </template>
      </div>`,
  }

  const ChatHeader = {
    props: { peer: Object, state: String, seconds: Number, reason: String },
    emits: ['reconnect'],
    components: { ConnectionStatus },
    setup () { return { t, boot } },
    template: `
      <header class="topbar">
        <a class="topbar-back" :href="boot.rooms_path" :aria-label="t('back')">
          <svg viewBox="0 0 24 24" width="24" height="24" aria-hidden="true"><path d="M15 5l-7 7 7 7" fill="none" stroke="currentColor" stroke-width="2.2" stroke-linecap="round" stroke-linejoin="round"/></svg>
        </a>
        <div class="topbar-main">
          <h1 class="topbar-title">{{ peer ? peer.name : boot.peer_name }}</h1>
          <span v-if="peer && peer.online" class="peer-online">{{ t('peerOnline') }}</span>
        </div>
        <ConnectionStatus :state="state" :seconds="seconds" :reason="reason" @reconnect="$emit('reconnect')" />
      </header>`,
  }

  // A photo in the thread: its thumbnail, sized before it loads, a link to the
  // full image (a plain click opens it here; a new tab gets the image itself).
  const PhotoThumb = {
    props: { photo: Object, alt: String },
    emits: ['open'],
    setup (props, { emit }) {
      const size = computed(() => thumbSize(props.photo.width, props.photo.height))
      function onClick (event) {
        if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return
        event.preventDefault()
        emit('open')
      }
      return { size, onClick, photoUrl, thumbUrl, t }
    },
    template: `
      <a class="photo-link" :href="photoUrl(photo.id)" :aria-label="t('photo.open') + ': ' + alt" @click="onClick">
        <img class="photo-thumb" :src="thumbUrl(photo.id)" :width="size.width" :height="size.height" :alt="alt"
          loading="lazy" decoding="async">
      </a>`,
  }

  const MessageBubble = {
    props: { message: Object, mine: Boolean, unreadByPeer: Boolean, showSender: Boolean },
    emits: ['open-photo'],
    components: { PhotoThumb },
    setup () { return { t, formatTime } },
    template: `
      <li class="message-row" :class="{ 'is-mine': mine, 'is-spread': message.type === 'spread' }" :data-id="message.id">
        <div v-if="message.type === 'spread'" class="announcement">
          <div class="announcement-head"><span aria-hidden="true">📢</span> {{ t('spreadLabel') }} · {{ message.sender_name }}</div>
          <p class="bubble-text">{{ message.content }}</p>
          <div class="announcement-foot">
            <span v-if="mine && unreadByPeer" class="unread-mark" :title="t('unreadByPeer')">1</span>
            <time class="message-time" :datetime="message.created_at">{{ formatTime(message.created_at) }}</time>
          </div>
        </div>
        <template v-else>
          <div v-if="!mine && showSender" class="avatar" aria-hidden="true">{{ message.sender_name.slice(0, 1) }}</div>
          <div class="message-body" :class="{ 'no-avatar': !mine && !showSender }">
            <div v-if="!mine && showSender" class="message-sender">{{ message.sender_name }}</div>
            <div class="message-line">
              <div v-if="message.photo" class="bubble bubble-photo">
                <PhotoThumb :photo="message.photo" :alt="t('photo.from', { name: message.sender_name })"
                  @open="$emit('open-photo', { photo: message.photo, alt: t('photo.from', { name: message.sender_name }) })" />
                <p v-if="message.content" class="photo-caption"><span class="bubble-text">{{ message.content }}</span></p>
              </div>
              <p v-else class="bubble"><span class="bubble-text">{{ message.content }}</span></p>
              <div class="message-meta">
                <span v-if="mine && unreadByPeer" class="unread-mark" :title="t('unreadByPeer')">1</span>
                <time class="message-time" :datetime="message.created_at">{{ formatTime(message.created_at) }}</time>
              </div>
            </div>
          </div>
        </template>
      </li>`,
  }

  const PendingBubble = {
    props: { item: Object },
    emits: ['retry', 'delete'],
    setup (props) {
      const isPhoto = computed(() => !!(props.item.needs_upload || props.item.photo))
      // The chosen file's preview while it uploads; after a reload, the server's thumbnail.
      const src = computed(() => props.item.preview || (props.item.photo ? thumbUrl(props.item.photo.id) : null))
      const size = computed(() => {
        const { photo, preview_width: width, preview_height: height } = props.item
        if (photo) return thumbSize(photo.width, photo.height)
        return width && height ? thumbSize(width, height) : null
      })
      const percent = computed(() => Math.round((props.item.progress || 0) * 100))
      return { isPhoto, src, size, percent, boot, t, CAMERA_PATH }
    },
    template: `
      <li class="message-row is-mine is-unsent" :class="'is-' + item.state" :data-client-id="item.client_id">
        <div class="message-body">
          <div class="message-line">
            <div v-if="isPhoto" class="bubble bubble-photo">
              <div class="photo-frame">
                <img v-if="src && size" class="photo-thumb" :src="src" :width="size.width" :height="size.height"
                  :alt="t('photo.from', { name: boot.name })">
                <span v-else class="photo-placeholder" role="img" :aria-label="t('photo.unreadable')">
                  <svg viewBox="0 0 24 24" width="40" height="40" aria-hidden="true"><path :d="CAMERA_PATH" fill="none" stroke="currentColor" stroke-width="1.6" stroke-linejoin="round"/><circle cx="12" cy="12.8" r="3.3" fill="none" stroke="currentColor" stroke-width="1.6"/></svg>
                </span>
                <div v-if="item.progress !== null" class="upload-progress">
                  <progress max="100" :value="percent" :aria-label="t('photo.uploading', { n: percent })"></progress>
                  <button type="button" class="chip-button upload-cancel" @click="$emit('delete', item.client_id)">{{ t('photo.cancel') }}</button>
                </div>
              </div>
              <p v-if="item.content" class="photo-caption"><span class="bubble-text">{{ item.content }}</span></p>
            </div>
            <p v-else class="bubble" :class="{ 'bubble-spread': item.type === 'spread' }"><span class="bubble-text">{{ item.content }}</span></p>
            <div class="message-meta">
              <span v-if="item.state === 'pending'" class="pending-mark" role="img" :aria-label="t('pending')">
                <span class="spinner" aria-hidden="true"></span>
              </span>
            </div>
          </div>
          <div v-if="item.state === 'failed'" class="failed-actions" role="alert">
            <span class="failed-text">{{ item.error || t('failed') }}</span>
            <button v-if="item.can_retry !== false" type="button" class="chip-button" @click="$emit('retry', item.client_id)">{{ t('retry') }}</button>
            <button type="button" class="chip-button chip-danger" @click="$emit('delete', item.client_id)">{{ t('delete') }}</button>
          </div>
        </div>
      </li>`,
  }

  const MessageList = {
    props: { messages: Array, notices: Array, outbox: Array, peerLastReadId: Number, hasOlder: Boolean, loadingOlder: Boolean },
    emits: ['older', 'retry', 'delete', 'open-photo'],
    components: { MessageBubble, PendingBubble },
    setup (props, { emit }) {
      const scroller = ref(null)
      const timeline = computed(() => {
        const items = []
        const noticesAfter = new Map()
        for (const notice of props.notices) {
          if (!noticesAfter.has(notice.afterId)) noticesAfter.set(notice.afterId, [])
          noticesAfter.get(notice.afterId).push(notice)
        }
        const placeNotices = (afterId) => {
          for (const notice of noticesAfter.get(afterId) || []) items.push({ kind: 'notice', key: notice.key, text: notice.text })
          noticesAfter.delete(afterId)
        }
        let previous = null
        placeNotices(0)
        for (const message of props.messages) {
          const day = dayKey(message.created_at)
          if (!previous || dayKey(previous.created_at) !== day) {
            items.push({ kind: 'day', key: 'day-' + day, text: formatDay(message.created_at) })
          }
          const showSender = !previous || previous.user_id !== message.user_id || previous.type === 'spread' ||
            dayKey(previous.created_at) !== day
          items.push({ kind: 'message', key: 'm' + message.id, message, showSender })
          previous = message
          placeNotices(message.id)
        }
        for (const [, rest] of noticesAfter) for (const notice of rest) items.push({ kind: 'notice', key: notice.key, text: notice.text })
        return items
      })
      let stickToBottom = true
      function onScroll () {
        const element = scroller.value
        stickToBottom = element.scrollHeight - element.scrollTop - element.clientHeight < NEAR_BOTTOM_PX
        if (element.scrollTop < NEAR_TOP_PX && props.hasOlder && !props.loadingOlder) emit('older')
      }
      let lastFirstId = 0
      let heightBefore = 0
      watch(() => [props.messages.length, props.outbox.length, props.notices.length], () => {
        const element = scroller.value
        if (!element) return
        const firstId = props.messages.length ? props.messages[0].id : 0
        const prepended = lastFirstId && firstId < lastFirstId
        heightBefore = element.scrollHeight
        const topBefore = element.scrollTop
        nextTick(() => {
          if (prepended) element.scrollTop = topBefore + (element.scrollHeight - heightBefore)
          else if (stickToBottom) element.scrollTop = element.scrollHeight
        })
        lastFirstId = firstId
      }, { flush: 'pre' })
      function scrollToBottom () {
        stickToBottom = true
        nextTick(() => { if (scroller.value) scroller.value.scrollTop = scroller.value.scrollHeight })
      }
      // The thread stays at its newest message while the space around it changes
      // (a chosen photo or a longer text makes the composer taller) and while a
      // message grows (a failed photo's reason and buttons appear under it).
      const list = ref(null)
      let resizes = null
      onMounted(() => {
        scrollToBottom()
        if (typeof ResizeObserver !== 'function') return
        resizes = new ResizeObserver(() => {
          if (stickToBottom && scroller.value) scroller.value.scrollTop = scroller.value.scrollHeight
        })
        resizes.observe(scroller.value)
        resizes.observe(list.value)
      })
      onBeforeUnmount(() => { if (resizes) resizes.disconnect() })
      return { scroller, list, timeline, onScroll, scrollToBottom, t, boot }
    },
    template: `
      <div class="timeline-scroller" ref="scroller" @scroll.passive="onScroll">
        <p v-if="loadingOlder" class="timeline-loading">{{ t('loadingOlder') }}</p>
        <ol ref="list" class="timeline" aria-live="polite">
          <template v-for="item in timeline" :key="item.key">
            <li v-if="item.kind === 'day'" class="day-separator"><span>{{ item.text }}</span></li>
            <li v-else-if="item.kind === 'notice'" class="system-notice"><span>{{ item.text }}</span></li>
            <MessageBubble v-else :message="item.message" :mine="item.message.user_id === boot.user_id"
              :show-sender="item.showSender" :unread-by-peer="item.message.id > peerLastReadId"
              @open-photo="$emit('open-photo', $event)" />
          </template>
          <PendingBubble v-for="item in outbox" :key="'p' + item.client_id" :item="item"
            @retry="$emit('retry', $event)" @delete="$emit('delete', $event)" />
        </ol>
        <p v-if="!messages.length && !outbox.length" class="timeline-empty">{{ t('noMessages') }}</p>
      </div>`,
  }

  const TypingIndicator = {
    props: { name: String },
    setup () { return { t } },
    template: `<div class="typing" aria-live="polite"><span class="typing-dots" aria-hidden="true"><i></i><i></i><i></i></span>{{ t('typing', { name }) }}</div>`,
  }

  function firstImage (files) {
    return Array.from(files || []).find((file) => file.type.startsWith('image/')) || null
  }

  // The composer: text, or a photo with the text as its optional caption. A photo
  // comes from the photo button (camera or gallery on a phone), a paste, or a drop
  // on the page (the page hands it over through attach()).
  const Composer = {
    props: { disabled: Boolean, canSpread: Boolean, maxChars: Number },
    emits: ['send', 'send-photo', 'typing'],
    setup (props, { emit, expose }) {
      const text = ref('')
      const asSpread = ref(false)
      const field = ref(null)
      const photo = ref(null) // { file, name, preview, reading }
      let attaching = 0
      function resize () {
        const element = field.value
        if (!element) return
        element.style.height = 'auto'
        element.style.height = Math.min(element.scrollHeight, 160) + 'px'
      }
      const canSend = computed(() => !props.disabled && (photo.value ? !photo.value.reading : !!text.value.trim()))
      function submit () {
        if (!canSend.value) return
        const content = text.value.trim()
        if (photo.value) {
          emit('send-photo', { file: photo.value.file, preview: photo.value.preview, caption: content })
          photo.value = null
        } else {
          emit('send', { content, type: asSpread.value ? 'spread' : 'chat' })
        }
        text.value = ''
        asSpread.value = false
        nextTick(resize)
      }
      async function attach (file) {
        if (!file || props.disabled || asSpread.value) return
        const attempt = (attaching += 1)
        photo.value = { file, name: file.name, preview: null, reading: true }
        const preview = await previewOf(file)
        if (attempt === attaching && photo.value) photo.value = { ...photo.value, preview, reading: false }
      }
      function removePhoto () {
        attaching += 1
        photo.value = null
        if (field.value) field.value.focus()
      }
      function onChosen (event) {
        const [file] = event.target.files
        event.target.value = '' // the same file can be chosen again
        if (file) attach(file)
      }
      function onPaste (event) {
        const data = event.clipboardData
        if (!data || data.getData('text/plain')) return // text with a picture of itself (office apps): the text
        const file = firstImage(data.files)
        if (!file) return
        event.preventDefault()
        attach(file)
      }
      function onKeydown (event) {
        // Enter during IME composition (Korean, Japanese …) picks a syllable: never send then.
        if (event.key !== 'Enter' || event.isComposing || event.keyCode === 229) return
        if (event.shiftKey) return
        event.preventDefault()
        submit()
      }
      function onInput () {
        resize()
        if (text.value.trim()) emit('typing')
      }
      expose({ focus: () => field.value && field.value.focus(), attach })
      return { text, asSpread, field, photo, canSend, submit, removePhoto, onChosen, onPaste, onKeydown, onInput, t, CAMERA_PATH }
    },
    template: `
      <form class="composer" @submit.prevent="submit">
        <label v-if="canSpread" class="spread-toggle" :class="{ 'is-on': asSpread }">
          <input type="checkbox" v-model="asSpread" :disabled="disabled || !!photo">
          <span aria-hidden="true">📢</span><span class="spread-toggle-text">{{ t('spread') }}</span>
        </label>
        <div v-if="photo" class="composer-attachment">
          <img v-if="photo.preview" class="attachment-preview" :src="photo.preview.url" width="48" height="48" :alt="t('photo.chosen')">
          <span v-else class="attachment-preview attachment-icon" aria-hidden="true">
            <svg viewBox="0 0 24 24" width="26" height="26"><path :d="CAMERA_PATH" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linejoin="round"/><circle cx="12" cy="12.8" r="3.3" fill="none" stroke="currentColor" stroke-width="1.8"/></svg>
          </span>
          <span class="attachment-name">{{ photo.name }}</span>
          <button type="button" class="attachment-remove" :aria-label="t('photo.remove')" @click="removePhoto">
            <svg viewBox="0 0 24 24" width="18" height="18" aria-hidden="true"><path d="M6 6l12 12M18 6L6 18" stroke="currentColor" stroke-width="2.2" stroke-linecap="round"/></svg>
          </button>
        </div>
        <div class="composer-row">
          <label class="photo-button" :class="{ 'is-disabled': disabled || asSpread }"
            :title="asSpread ? t('photo.notForSpread') : t('photo.choose')">
            <input type="file" accept="image/*" class="visually-hidden" :disabled="disabled || asSpread" @change="onChosen">
            <svg viewBox="0 0 24 24" width="24" height="24" aria-hidden="true"><path :d="CAMERA_PATH" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linejoin="round"/><circle cx="12" cy="12.8" r="3.3" fill="none" stroke="currentColor" stroke-width="1.8"/></svg>
            <span class="visually-hidden">{{ t('photo.choose') }}</span>
          </label>
          <label for="composer-text" class="visually-hidden">{{ t('message') }}</label>
          <textarea id="composer-text" ref="field" v-model="text" rows="1" :maxlength="maxChars"
            :placeholder="photo ? t('photo.caption') : t('placeholder')" :disabled="disabled"
            @keydown="onKeydown" @input="onInput" @paste="onPaste"></textarea>
          <button type="submit" class="send-button" :disabled="!canSend" :aria-label="t('send')">
            <svg viewBox="0 0 24 24" width="22" height="22" aria-hidden="true"><path d="M3 11.5L20.5 4 14 21l-3-7.5L3 11.5z" fill="currentColor"/></svg>
          </button>
        </div>
      </form>`,
  }

  // A photo full size, over everything: a modal dialog (focus stays inside, Escape
  // or a tap closes it, focus goes back to the thumbnail that opened it).
  const PhotoViewer = {
    props: { photo: Object },
    emits: ['close'],
    setup (props, { emit }) {
      const dialog = ref(null)
      let opener = null
      onMounted(() => {
        opener = document.activeElement
        dialog.value.showModal()
      })
      onBeforeUnmount(() => {
        if (dialog.value.open) dialog.value.close()
        if (opener && opener.isConnected) opener.focus()
      })
      function onCancel (event) { // Escape
        event.preventDefault()
        emit('close')
      }
      return { dialog, onCancel, photoUrl, t }
    },
    template: `
      <dialog ref="dialog" class="photo-viewer" :aria-label="t('photo.viewer')" @cancel="onCancel" @click="$emit('close')">
        <img class="photo-full" :src="photoUrl(photo.id)" :width="photo.width" :height="photo.height" :alt="photo.alt">
        <button type="button" class="photo-viewer-close" :aria-label="t('photo.close')" autofocus>
          <svg viewBox="0 0 24 24" width="26" height="26" aria-hidden="true"><path d="M6 6l12 12M18 6L6 18" stroke="currentColor" stroke-width="2.2" stroke-linecap="round"/></svg>
        </button>
      </dialog>`,
  }

  const ChatApp = {
    components: { ChatHeader, MessageList, TypingIndicator, Composer, PhotoViewer },
    setup () {
      const peerLastReadId = computed(() => (peer.value ? peer.value.last_read_id : 0))
      const composer = ref(null)
      const dragging = ref(false)
      // A file dropped anywhere on the page is a photo to send, never a page to open.
      const carriesFiles = (event) => Array.from((event.dataTransfer && event.dataTransfer.types) || []).includes('Files')
      function onDragOver (event) {
        if (!carriesFiles(event)) return
        event.preventDefault()
        event.dataTransfer.dropEffect = composer.value ? 'copy' : 'none'
        dragging.value = !!composer.value
      }
      function onDragLeave (event) {
        if (!event.relatedTarget) dragging.value = false // left the window
      }
      function onDrop (event) {
        dragging.value = false
        if (!carriesFiles(event)) return
        event.preventDefault()
        const file = firstImage(event.dataTransfer.files)
        if (file && composer.value) composer.value.attach(file)
      }
      const peerTyping = computed(() => peer.value && store.peerTypingUntil > store.now)
      let clock = null
      function onVisible () { if (document.visibilityState === 'visible') markRead() }
      function onOnline () { if (store.connection !== 'online') connect() }
      function onOffline () {
        if (store.connection === 'reconnecting') {
          clearTimeout(connection.retryTimer)
          clearInterval(connection.countdownTimer)
          store.connection = 'offline'
        }
      }
      onMounted(() => {
        loadOutbox()
        connect()
        clock = setInterval(() => { store.now = Date.now() }, 1000)
        document.addEventListener('visibilitychange', onVisible)
        window.addEventListener('online', onOnline)
        window.addEventListener('offline', onOffline)
        document.addEventListener('dragover', onDragOver)
        document.addEventListener('dragleave', onDragLeave)
        document.addEventListener('drop', onDrop)
      })
      onBeforeUnmount(() => {
        clearInterval(clock)
        document.removeEventListener('visibilitychange', onVisible)
        window.removeEventListener('online', onOnline)
        window.removeEventListener('offline', onOffline)
        document.removeEventListener('dragover', onDragOver)
        document.removeEventListener('dragleave', onDragLeave)
        document.removeEventListener('drop', onDrop)
      })
      function onSend ({ content, type }) {
        queueMessage(content, type)
      }
      function onSendPhoto ({ file, preview, caption }) {
        queuePhoto(file, preview, caption)
      }
      function reconnectNow () {
        connection.attempts = 0
        connect()
      }
      return { store, boot, peer, peerLastReadId, peerTyping, composer, dragging, onSend, onSendPhoto, sendTyping,
        retryMessage, deleteMessage, fetchOlder, reconnectNow, openPhoto, closePhoto, t }
    },
    template: `
      <div class="chat-page" :class="{ 'is-dragging': dragging }">
        <ChatHeader :peer="peer" :state="store.connection" :seconds="store.reconnectInS" :reason="store.stopReason"
          @reconnect="reconnectNow" />
        <main class="chat-main">
          <MessageList :messages="store.messages" :notices="store.notices" :outbox="store.outbox"
            :peer-last-read-id="peerLastReadId" :has-older="store.hasOlder" :loading-older="store.loadingOlder"
            @older="fetchOlder" @retry="retryMessage" @delete="deleteMessage"
            @open-photo="openPhoto($event.photo, $event.alt)" />
          <TypingIndicator v-if="peerTyping" :name="peer.name" />
          <p v-if="store.status === 'ended'" class="room-ended-note">{{ t('roomEnded') }}</p>
          <Composer v-else ref="composer" :disabled="store.connection === 'stopped'" :can-spread="boot.role === 'trainer'"
            :max-chars="boot.max_message_chars" @send="onSend" @send-photo="onSendPhoto" @typing="sendTyping" />
        </main>
        <p v-if="dragging" class="drop-hint" aria-hidden="true">{{ t('photo.drop') }}</p>
        <PhotoViewer v-if="store.viewer" :key="store.viewer.id" :photo="store.viewer" @close="closePhoto" />
      </div>`,
  }

  // --------------------------------------------------- notifications ---
  // The service worker shows pushes (SPEC 10); the page only registers it and,
  // from a tap on the bell and never before, asks for permission and subscribes.

  const PUSH_KEY_PATH = '/distributor/push/key'
  const PUSH_SUBSCRIPTIONS_PATH = '/distributor/push/subscriptions'
  const workerReady = 'serviceWorker' in navigator
    ? navigator.serviceWorker.register('/distributor/sw.js', { scope: '/distributor/' }).catch(() => null)
    : Promise.resolve(null)

  function isIphoneBrowserTab () {
    return /iPhone|iPad|iPod/.test(navigator.userAgent) && !navigator.standalone &&
      !window.matchMedia('(display-mode: standalone)').matches
  }

  function base64UrlBytes (text) {
    const base64 = text.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - text.length % 4) % 4)
    return Uint8Array.from(atob(base64), (char) => char.charCodeAt(0))
  }

  async function pushState () {
    if (!('serviceWorker' in navigator) || !('PushManager' in window) || !('Notification' in window)) {
      return isIphoneBrowserTab() ? 'ios' : 'unsupported'
    }
    if (Notification.permission === 'denied') return 'blocked'
    const registration = await workerReady
    if (!registration) return 'unsupported'
    const subscription = await registration.pushManager.getSubscription()
    return subscription && Notification.permission === 'granted' ? 'on' : 'off'
  }

  async function sendSubscription (method, body) {
    return fetch(PUSH_SUBSCRIPTIONS_PATH, {
      method, credentials: 'same-origin', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    })
  }

  async function turnPushOn () {
    const permission = await Notification.requestPermission()
    if (permission !== 'granted') return permission === 'denied' ? 'blocked' : 'off'
    const registration = await navigator.serviceWorker.ready
    const { public_key: publicKey } = await (await fetch(PUSH_KEY_PATH)).json()
    const subscription = await registration.pushManager.subscribe({
      userVisibleOnly: true, applicationServerKey: base64UrlBytes(publicKey),
    })
    const response = await sendSubscription('POST', subscription.toJSON())
    if (response.ok) return 'on'
    await subscription.unsubscribe()
    return 'off'
  }

  async function keepSubscriptionWithThisUser () {
    try {
      const registration = await workerReady
      const subscription = registration && await registration.pushManager.getSubscription()
      if (subscription) await sendSubscription('POST', subscription.toJSON())
    } catch (error) { /* offline: the next visit tries again */ }
  }

  async function turnPushOff () {
    const registration = await workerReady
    const subscription = registration && await registration.pushManager.getSubscription()
    if (subscription) {
      await sendSubscription('DELETE', { endpoint: subscription.endpoint })
      await subscription.unsubscribe()
    }
    return 'off'
  }

  const NotificationBell = {
    setup () {
      const state = ref('checking')
      const busy = ref(false)
      onMounted(async () => {
        state.value = await pushState()
        // This browser's subscription belongs to whoever is signed in here now.
        if (state.value === 'on') await keepSubscriptionWithThisUser()
      })
      async function toggle () {
        if (busy.value || (state.value !== 'on' && state.value !== 'off')) return
        busy.value = true
        try {
          state.value = state.value === 'on' ? await turnPushOff() : await turnPushOn()
        } catch (error) {
          state.value = await pushState()
        } finally {
          busy.value = false
        }
      }
      return { state, busy, toggle, t }
    },
    template: `
      <button type="button" class="bell" :class="'bell-' + state" :aria-pressed="state === 'on' ? 'true' : 'false'"
              :aria-disabled="state !== 'on' && state !== 'off' ? 'true' : 'false'" :disabled="busy"
              :title="t('bellHelp.' + state)" @click="toggle">
        <span aria-hidden="true">{{ state === 'on' ? '🔔' : '🔕' }}</span>
        <span class="bell-label">{{ t('bell.' + state) }}</span>
      </button>`,
  }

  // ------------------------------------------------------- room list ---

  const RoomItem = {
    props: { room: Object },
    setup () { return { t, boot, formatActivity } },
    computed: {
      title () { return boot.role === 'trainer' ? this.room.member_name : this.room.trainer_name },
    },
    template: `
      <li class="room-item" :class="{ 'is-ended': room.status === 'ended', 'has-unread': room.unread_count > 0 }" :data-room-id="room.id">
        <a class="room-link" :href="'/distributor/chat?room_id=' + encodeURIComponent(room.id)">
          <span class="avatar avatar-large" aria-hidden="true">{{ title.slice(0, 1) }}</span>
          <span class="room-main">
            <span class="room-name">{{ title }} <span v-if="room.status === 'ended'" class="room-ended">{{ t('ended') }}</span></span>
            <span class="room-last">{{ room.last_message === null ? t('noMessages') : room.last_message }}</span>
          </span>
          <span class="room-side">
            <time class="room-time" :datetime="room.last_activity">{{ formatActivity(room.last_activity) }}</time>
            <span v-if="room.unread_count > 0" class="badge" :aria-label="t('unread', { n: room.unread_count })">{{ room.unread_count > 999 ? '999+' : room.unread_count }}</span>
          </span>
        </a>
      </li>`,
  }

  const RoomsApp = {
    components: { RoomItem, NotificationBell },
    setup () {
      let timer = null
      async function refresh () {
        try {
          const response = await fetch(`${boot.rooms_path}?format=json`, { headers: { Accept: 'application/json' }, credentials: 'same-origin' })
          if (response.status === 401) {
            location.reload()
            return
          }
          if (response.ok) store.rooms = (await response.json()).chat_rooms
        } catch (error) { /* offline: keep what is shown, try again on the next tick */ }
      }
      // Polling, not a socket: the room list is one indexed query, a gym has a
      // handful of rooms per person, and the protocol has no user-level socket.
      function onVisible () { if (document.visibilityState === 'visible') refresh() }
      onMounted(() => {
        timer = setInterval(() => { if (document.visibilityState === 'visible') refresh() }, ROOMS_POLL_MS)
        document.addEventListener('visibilitychange', onVisible)
        window.addEventListener('online', refresh)
      })
      onBeforeUnmount(() => {
        clearInterval(timer)
        document.removeEventListener('visibilitychange', onVisible)
        window.removeEventListener('online', refresh)
      })
      // Sign-out forgets what this browser keeps for the user: unsent messages, and
      // the push subscription (the next person must not get their notifications).
      async function signOut (event) {
        const form = event.target
        forgetUnsentMessages()
        try {
          await Promise.race([turnPushOff(), new Promise((resolve) => setTimeout(resolve, 3000))])
        } catch (error) { /* signed out all the same */ }
        form.submit()
      }
      return { store, boot, t, signOut }
    },
    template: `
      <div class="rooms-page">
        <header class="topbar">
          <div class="topbar-main"><h1 class="topbar-title">{{ t('chats') }}</h1></div>
          <span class="topbar-side">{{ boot.name }}</span>
          <NotificationBell />
          <form method="post" :action="boot.logout_path" @submit.prevent="signOut"><button type="submit" class="chip-button">{{ t('logout') }}</button></form>
        </header>
        <main>
          <ul v-if="store.rooms.length" class="room-list" :aria-label="t('rooms', { n: store.rooms.length })">
            <RoomItem v-for="room in store.rooms" :key="room.id" :room="room" />
          </ul>
          <p v-else class="rooms-empty">{{ t('noRooms') }}</p>
        </main>
      </div>`,
  }

  createApp(boot.page === 'chat' ? ChatApp : RoomsApp).mount('#app')
})()
